"""One coordinator port, one run (align_jax.parallel.run_guard) and the lost-peer watch (align_jax.parallel.peer_watch).

Pure Python: real sockets on free localhost ports, and an in-memory stand-in for the
coordination service's key-value store; the end-to-end cases with main.py are in
tests/test_multiprocess_soak.py.
"""

import contextlib
import socket
import threading
import time

import pytest

from align_jax.parallel import peer_watch, run_guard
import multihost


def _identity(pid, num=2, workdir="/runs/a", config="c1"):
  return run_guard.Identity(workdir, config, num, pid)


def _in_thread(fn, *args):
  """Runs ``fn(*args)`` in a thread; returns a function giving (result, error) once done."""
  box = {}

  def target():
    try:
      box["result"] = fn(*args)
    except Exception as error:  # pylint: disable=broad-except
      box["error"] = error

  thread = threading.Thread(target=target, daemon=True)
  thread.start()

  def outcome(timeout=30):
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn.__name__} did not return within {timeout} s"
    return box.get("result"), box.get("error")
  return outcome


def test_every_process_gets_process_0s_run_id():
  port = multihost.free_port()
  coordinator = _in_thread(run_guard.accept_members, f"127.0.0.1:{port}",
                           _identity(0, num=3), 20)
  members = [_in_thread(run_guard.join, f"127.0.0.1:{port}", _identity(pid, num=3), 20)
             for pid in (2, 1)]
  run_id, error = coordinator()
  assert error is None and len(run_id) == 12
  assert [m() for m in members] == [(run_id, None), (run_id, None)]


def test_a_member_may_start_before_process_0():
  port = multihost.free_port()
  member = _in_thread(run_guard.join, f"127.0.0.1:{port}", _identity(1), 20)
  time.sleep(1.0)  # the member retries while nothing listens
  run_id, error = run_guard.accept_members(f"127.0.0.1:{port}", _identity(0), 20), None
  assert member() == (run_id, None)


@pytest.mark.parametrize("change, here, there", [
    (dict(num=3), "--num_processes=2 here but 3 on process 1",
     "--num_processes=3 here but 2 on process 0"),
    (dict(config="c2"), "the config differs from process 1's (hash c1 here, c2 there)",
     "the config differs from process 0's (hash c2 here, c1 there)"),
])
def test_a_mismatch_stops_both_sides_naming_both_values(change, here, there):
  port = multihost.free_port()
  coordinator = _in_thread(run_guard.accept_members, f"127.0.0.1:{port}", _identity(0), 20)
  _, member_error = _in_thread(run_guard.join, f"127.0.0.1:{port}", _identity(1, **change), 20)()
  _, coordinator_error = coordinator()
  assert isinstance(coordinator_error, run_guard.RunGuardError)
  assert str(coordinator_error).startswith(here)
  assert isinstance(member_error, run_guard.RunGuardError)
  assert str(member_error).startswith(there)


def test_a_duplicate_process_id_stops_the_run():
  port = multihost.free_port()
  coordinator = _in_thread(run_guard.accept_members, f"127.0.0.1:{port}",
                           _identity(0, num=3), 20)
  first = _in_thread(run_guard.join, f"127.0.0.1:{port}", _identity(1, num=3), 20)
  time.sleep(0.5)
  _, second_error = _in_thread(run_guard.join, f"127.0.0.1:{port}", _identity(1, num=3), 20)()
  _, coordinator_error = coordinator()
  assert "two processes claim --process_id=1" in str(coordinator_error)
  assert "two processes claim --process_id=1" in str(second_error)
  _, first_error = first()  # accepted, then told that process 0 stopped the run
  assert str(first_error).startswith("process 0 stopped the run: two processes claim")


def test_another_runs_process_is_turned_away_and_the_run_goes_on():
  port = multihost.free_port()
  coordinator = _in_thread(run_guard.accept_members, f"127.0.0.1:{port}", _identity(0), 20)
  _, stranger = _in_thread(run_guard.join, f"127.0.0.1:{port}",
                           _identity(1, workdir="/runs/b"), 20)()
  assert str(stranger) == (f"the coordinator at port {port} belongs to another run (workdir "
                           "/runs/a); give this run its own --coordinator_address port")
  own = _in_thread(run_guard.join, f"127.0.0.1:{port}", _identity(1), 20)
  run_id, error = coordinator()
  assert error is None and own() == (run_id, None)


def _reuseport_listener():
  """A listener as gRPC makes one (SO_REUSEADDR + SO_REUSEPORT) that answers in another protocol."""
  server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  server.bind(("::", 0))
  server.listen(8)

  def answer():
    while True:
      try:
        conn, _ = server.accept()
      except OSError:
        return
      with conn:  # as gRPC does: read the client's preface, answer in HTTP/2, close
        conn.settimeout(5)
        with contextlib.suppress(OSError):
          conn.recv(4096)
          conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00")  # a SETTINGS frame
  threading.Thread(target=answer, daemon=True).start()
  return server


def test_a_port_taken_by_a_grpc_style_listener_is_refused_on_both_sides():
  with _reuseport_listener() as server:
    port = server.getsockname()[1]
    with pytest.raises(run_guard.RunGuardError) as error:
      run_guard.accept_members(f"127.0.0.1:{port}", _identity(0), 5)
    assert str(error.value) == (
        f"--coordinator_address=127.0.0.1:{port}: process 0 cannot listen on port {port} "
        "(Address already in use): another run (or program) uses it; pick a free port, the same "
        "on every process")
    with pytest.raises(run_guard.RunGuardError) as error:
      run_guard.join(f"127.0.0.1:{port}", _identity(1), 5)
    assert str(error.value).startswith(
        f"something other than this run's process 0 answers at --coordinator_address="
        f"127.0.0.1:{port} (another run's coordinator?)")


def test_nobody_at_the_address_times_out_in_one_line():
  port = multihost.free_port()
  start = time.time()
  with pytest.raises(run_guard.RunGuardError) as error:
    run_guard.join(f"127.0.0.1:{port}", _identity(1), 1.5)
  assert 1.5 <= time.time() - start < 10
  assert str(error.value) == (
      f"--coordinator_address=127.0.0.1:{port}: nothing answered there within "
      "--initialization_timeout=1.5 s; start process 0 (--process_id=0) on that host, with the "
      "same address and port")


# ---- the lost-peer watch ---------------------------------------------------------------------

class FakeStore:
  """The coordination service's key-value store, as jax's client sees it; ``down`` = gone."""

  def __init__(self):
    self.values, self.down, self.lock = {}, False, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if self.down:
        raise RuntimeError("UNAVAILABLE: Socket closed")
      assert allow_overwrite or key not in self.values
      self.values[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      if self.down:
        raise RuntimeError("UNAVAILABLE: Socket closed")
      return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watches(store, timeout=1.0, num=2):
  lines = {}
  watches = []
  for pid in range(num):
    def exit_fn(line, pid=pid):
      lines[pid] = (line, time.monotonic())
    watch = peer_watch.PeerWatch(store, pid, num, timeout, "run1", exit_fn=exit_fn)
    watch.progress = lambda: "the last checkpoint known complete is step 40 (/w/checkpoints/40)"
    watches.append(watch.start())
  return watches, lines


def _wait_for(lines, pid, limit):
  deadline = time.monotonic() + limit
  while pid not in lines and time.monotonic() < deadline:
    time.sleep(0.05)
  return lines.get(pid)


def test_a_silent_peer_is_named_within_the_timeout():
  store = FakeStore()
  watches, lines = _watches(store)
  time.sleep(1.5)
  assert lines == {}  # both alive: nobody says anything
  watches[1].stop()  # process 1 stops beating (SIGKILL)
  stopped = time.monotonic()
  line, when = _wait_for(lines, 0, 5)
  # the timeout counts from the last beat seen (up to one beat before the stop), and is
  # judged once a beat: between timeout - 1 beat and timeout + 2 beats (+ scheduling slack)
  assert 0.75 <= when - stopped <= 2.0
  assert line == ("error: lost process 1 of 2 (no sign of life for 1 s); the last checkpoint "
                  "known complete is step 40 (/w/checkpoints/40); run the same command on every "
                  "process again to resume from it")
  watches[0].stop()


def test_a_finished_peer_is_not_lost_and_a_failed_one_is_named_with_its_error():
  store = FakeStore()
  watches, lines = _watches(store, num=3)
  time.sleep(0.6)
  watches[2].finish()
  watches[1].fail("error: non-finite loss (nan) at step 7")
  line, _ = _wait_for(lines, 0, 3)
  assert line.startswith("error: process 1 of 3 stopped: error: non-finite loss (nan) at step 7;")
  time.sleep(1.5)
  assert 2 not in lines and all("process 2" not in text for text, _ in lines.values())
  for watch in watches:
    watch.stop()


def test_the_coordinator_gone_is_named_by_the_others():
  store = FakeStore()
  watches, lines = _watches(store)
  time.sleep(0.6)
  store.down = True  # process 0, which serves the store, is gone
  line, _ = _wait_for(lines, 1, 4)
  assert line.startswith("error: lost process 0 of 2, the coordinator (no answer for 1 s);")
  for watch in watches:
    watch.stop()
