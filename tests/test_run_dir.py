"""align_jax.run.reader: checkpoint steps, params at a step (exactly the trained ones), the config."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from align_jax.run import checkpoint as checkpoint_lib
from align_jax.config import schema as config_lib
from align_jax.run import reader as run_dir
from align_jax.parallel import mesh as sharding
from align_jax.train import loop as train, step as step_builder


def _host(tree):
  return jax.tree.map(np.array, tree)


@pytest.fixture(scope="module")
def trained(tiny_demo_run):
  """The session's 6-step demo run (checkpoints at 3 and 6) and its params after steps 3 and 6,
  taken from the trainer's own state while stepping it the same way outside the loop."""
  config, workdir, _ = tiny_demo_run
  trainer = train.build_trainer(config)
  state, reference = trainer.state, {}
  for step in range(1, config.total_steps + 1):
    state, _ = trainer.train_step(state, trainer.frozen, trainer.next_batch())
    if step % config.checkpoint_every == 0:
      reference[step] = _host(state.params)
  return config, workdir, reference


def test_steps_list_finished_checkpoints_only(trained, tmp_path):
  _, workdir, _ = trained
  assert run_dir.steps(workdir) == [3, 6]
  assert run_dir.steps(str(tmp_path / "nothing")) == []
  assert not (tmp_path / "nothing").exists()  # looking did not create the folder
  partial = tmp_path / "partial"
  shutil.copytree(workdir, partial)
  os.rename(partial / "checkpoints" / "6", partial / "checkpoints" / "6.orbax-checkpoint-tmp-1")
  assert run_dir.steps(str(partial)) == [3]
  # A reader removes nothing, not even an unfinished save (the run may still be writing it).
  assert (partial / "checkpoints" / "6.orbax-checkpoint-tmp-1").exists()


def test_restore_at_a_step_equals_the_trained_params_exactly(trained):
  _, workdir, reference = trained
  for step in (3, 6):
    params, got_step, path = run_dir.restore_params(workdir, step)
    assert got_step == step
    assert path == os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
    assert jax.tree.structure(params) == jax.tree.structure(reference[step])
    jax.tree.map(np.testing.assert_array_equal, params, reference[step])
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  latest = run_dir.restore_params(workdir)
  assert latest.step == 6
  jax.tree.map(np.testing.assert_array_equal, latest.params, reference[6])
  assert not np.allclose(reference[3]["image"]["hidden"]["kernel"],
                         reference[6]["image"]["hidden"]["kernel"])


def test_restore_onto_given_shardings(trained, devices):
  config, workdir, reference = trained
  mesh = sharding.make_mesh(("data",), (8,))
  sharded = config.copy_and_resolve_references()
  sharded.mesh.param_rules = ((r"params/.*/kernel", ("data", None)),)
  params = run_dir.restore_params(
      workdir, 3, shardings=lambda shapes: step_builder.params_shardings(shapes, mesh, sharded)
  ).params
  kernel = params["image"]["hidden"]["kernel"]
  assert kernel.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data",
                                                                                         None))
  assert len({s.index[0].start for s in kernel.addressable_shards}) == 8  # split over 8 devices
  assert params["logit"]["log_temperature"].sharding.is_fully_replicated
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), params,
               reference[3])
  # A pytree of shardings works as well as a function of the shapes.
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), reference[6])
  again = run_dir.restore_params(workdir, shardings=replicated).params
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), again, reference[6])


def test_missing_and_damaged_checkpoints_are_one_line_errors(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 4 .*steps: \[3, 6\]"):
    run_dir.restore_params(workdir, 4)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty.*checkpoints.*train "
                     "first"):
    run_dir.restore_params(str(tmp_path / "empty"))
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  integrity = damaged / "checkpoints" / "6" / "integrity" / "metadata"
  saved = json.loads(integrity.read_text())
  key = ".params['image']['hidden']['kernel']"
  saved["checksums"][key] = (saved["checksums"][key] + 1) % 2**32
  integrity.write_text(json.dumps(saved))
  with pytest.raises(checkpoint_lib.CheckpointError) as error:
    run_dir.restore_params(str(damaged), 6)  # asked for: no fallback
  assert str(error.value).startswith(f"checkpoint step 6 at {damaged}/checkpoints/6 cannot be "
                                     "restored (state: checksum mismatch in 1 ")
  assert str(error.value).endswith("; other steps available with --step: 3")
  assert run_dir.restore_params(str(damaged), 3).step == 3
  assert run_dir.steps(str(damaged)) == [3, 6]  # reading moved nothing aside
  assert not (damaged / "checkpoints_corrupt").exists()


def test_damaged_latest_falls_back_read_only_in_one_line(trained, tmp_path, caplog):
  """Issue 21, item 5: like a resume (the newest checkpoint that restores), but nothing moves."""
  _, workdir, reference = trained
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  shutil.rmtree(damaged / "checkpoints" / "6" / "integrity")  # without checksums: damaged
  caplog.set_level("INFO")
  params, step, path = run_dir.restore_params(str(damaged))
  assert step == 3 and path == f"{damaged}/checkpoints/3"
  jax.tree.map(np.testing.assert_array_equal, params, reference[3])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert warnings == [
      f"checkpoint step 6 at {damaged}/checkpoints/6 cannot be restored (integrity: the state's "
      "checksums are missing, so the state cannot be verified (a state/ copied in from elsewhere "
      "looks the same)); left it in place and used step 3 instead (steps available with --step: "
      "3)"]
  assert sorted(os.listdir(damaged / "checkpoints")) == ["3", "6"]
  assert not (damaged / "checkpoints_corrupt").exists()
  for step_dir in ("3", "6"):
    (damaged / "checkpoints" / step_dir / "data" / "metadata").write_text("{garbage")
  with pytest.raises(checkpoint_lib.CheckpointError, match=(
      r"^no checkpoint in .*damaged/checkpoints can be restored: step 6: integrity: .*\(steps 3 "
      r"fail too\); nothing was changed$")):
    run_dir.restore_params(str(damaged))


def test_config_round_trip_keeps_tuples(tmp_path):
  config = config_lib.default_config()
  config.total_steps = 11
  config.mesh.axes = ("data", "model")
  config.mesh.shape = (4, 2)
  config.mesh.param_rules = ((r"kernel", ("data", None)), (r"bias", (("data", "model"),)))
  config.evals.heldout = dict(type="retrieval", data=dict(split="heldout"), ks=(1, 5))
  run_dir.write_config(str(tmp_path), config)
  loaded = run_dir.read_config(str(tmp_path))
  assert loaded.total_steps == 11
  assert loaded.mesh.axes == ("data", "model") and isinstance(loaded.mesh.axes, tuple)
  assert loaded.mesh.shape == (4, 2)
  assert loaded.mesh.param_rules == ((r"kernel", ("data", None)), (r"bias", (("data", "model"),)))
  assert isinstance(loaded.mesh.param_rules[1][1][0], tuple)
  assert loaded.evals.heldout.data.split == "heldout"
  # Every schema key reads back as it was written.
  original, back = config.to_dict(), loaded.to_dict()
  assert {k: v for k, v in back.items() if k != "evals"} == {
      k: v for k, v in original.items() if k != "evals"}


def test_config_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.json is missing: do this"):
    run_dir.read_config(str(tmp_path), fix="do this")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    run_dir.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"mesh": {"axes": 3}}))
  with pytest.raises(ValueError, match=r"config.json does not match align_jax's config schema"):
    run_dir.read_config(str(tmp_path))
