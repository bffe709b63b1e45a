"""TensorBoard event files of scalars, written (and read back) without TensorFlow or tensorboardX.

An event file is a sequence of TFRecord frames (length, masked CRC-32C of the length, payload,
masked CRC-32C of the payload), each payload one serialized ``tensorflow.Event`` protobuf: first
``file_version = "brain.Event:2"``, then one event per logged step holding a ``Summary`` of
``(tag, simple_value)`` pairs. The two messages are small enough to encode here by hand, which
keeps tag names exactly as given (tensorboardX's ``add_scalar`` rewrites ``eval/i2t@1`` to
``eval/i2t_1``) and avoids importing tensorboardX (which imports torch when it is installed).

:class:`EventFile` appends to a local file (flushed after every step) and, for a URL folder,
keeps the file's bytes in memory and replaces the whole object on each flush (object stores have
no append; the file only ever grows, so a reader sees a consistent prefix).
"""

from __future__ import annotations

import os
import socket
import struct
import time

import google_crc32c

from align_jax.run import storage

FILE_VERSION = b"brain.Event:2"


def _masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative int64
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def frame(payload: bytes) -> bytes:
  """One TFRecord frame around a serialized Event."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", _masked_crc(header)) + payload
          + struct.pack("<I", _masked_crc(payload)))


def encode_event(wall_time: float, step: int = 0, scalars: dict[str, float] | None = None,
                 file_version: bytes | None = None) -> bytes:
  """A serialized ``Event`` (wall_time = 1, step = 2, file_version = 3, summary = 5)."""
  out = b"\x09" + struct.pack("<d", wall_time)
  if step:
    out += b"\x10" + _varint(int(step))
  if file_version is not None:
    out += _field(3, file_version)
  if scalars:
    values = b"".join(  # Summary.value = 1: Value{tag = 1, simple_value = 2 (float)}
        _field(1, _field(1, tag.encode("utf-8")) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _field(5, values)
  return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def read_steps(data: bytes) -> list[tuple[float, int]]:
  """(wall_time, step) of each intact event with a summary in an event file's bytes.

  Reading stops at the first torn or damaged frame (a kill during a write).
  """
  events, pos = [], 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    (length_crc,) = struct.unpack_from("<I", data, pos + 8)
    end = pos + 12 + length + 4
    if length_crc != _masked_crc(data[pos:pos + 8]) or end > len(data):
      break
    payload = data[pos + 12:end - 4]
    if struct.unpack_from("<I", data, end - 4)[0] != _masked_crc(payload):
      break
    wall_time, step, field_pos, summary = 0.0, 0, 0, False
    try:
      while field_pos < len(payload):
        key, field_pos = _read_varint(payload, field_pos)
        number, wire = key >> 3, key & 7
        if wire == 1:
          if number == 1:
            (wall_time,) = struct.unpack_from("<d", payload, field_pos)
          field_pos += 8
        elif wire == 0:
          value, field_pos = _read_varint(payload, field_pos)
          if number == 2:
            step = value - (1 << 64) if value >> 63 else value
        elif wire == 2:
          size, field_pos = _read_varint(payload, field_pos)
          field_pos += size
          summary = summary or number == 5
        elif wire == 5:
          field_pos += 4
        else:
          break
    except (IndexError, struct.error):
      break
    if summary:
      events.append((wall_time, step))
    pos = end
  return events


def is_event_file(name: str) -> bool:
  return "tfevents" in name


class EventFile:
  """A new event file in ``folder`` (local or URL) that scalars are added to, step by step."""

  def __init__(self, folder: str):
    self.folder = folder
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
    self.path = storage.join(folder, name)
    self._remote = storage.is_url(folder)
    self._buffer = bytearray()  # the whole file, for a URL
    self._file = None
    if not self._remote:
      storage.makedirs(folder)
      self._file = storage.open_file(self.path, "ab")
    self._append(frame(encode_event(time.time(), file_version=FILE_VERSION)))

  def _append(self, data: bytes) -> None:
    if self._remote:
      self._buffer += data
    else:
      self._file.write(data)

  def add(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
    """One event of ``scalars`` at ``step`` (call :meth:`flush` to make it visible)."""
    if scalars:
      self._append(frame(encode_event(time.time() if wall_time is None else wall_time, step,
                                      scalars)))

  def flush(self) -> None:
    if self._remote:
      storage.write_bytes(self.path, bytes(self._buffer))
    else:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
