"""The command lines under mistakes and faults: each try ends in a short named error (cause and
fix, no third-party traceback) with a non-zero exit code, or in the right behaviour, and leaves
the workdir as it was. The CLIs' ``main`` functions run in-process (a subprocess costs a JAX
import each); one tiny run trained once serves every try."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys

import pytest

from tests._train_helpers import TINY, encoded_source, tiny_config

TINY_FLAG = "channels=(4,8,8,8),units=(0,1,0,0),embedding_size=8"


def tree_hash(root) -> str:
    """Hash of every path, size and byte under ``root``: unchanged means nothing written."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step tiny run (checkpoints at steps 2 and 4)."""
    from kdface.training._run import run
    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    run(tiny_config(workdir), data_dir=str(workdir), source=encoded_source(), num_classes=4)
    return str(workdir)


def tiny_argv(workdir, *extra):
    return ["kdface.train", f"--workdir={workdir}", "--train_data=unused",
            "--student=sphereface_custom", f"--student_options={TINY_FLAG}",
            "--input_size=16,16", "--head=cosface", "--margin_scale=16", "--margin=0.1",
            "--batch_size=8", "--steps=4", "--learning_rate=0.05", "--schedule=constant",
            "--save_every=2", "--log_every=1", "--noasync_checkpoints", "--noprogress",
            *extra]


def train_main(argv, capsys):
    from kdface import train
    code = train.main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def test_rerun_with_another_architecture_is_refused_before_writing(trained, capsys):
    before = tree_hash(trained)
    argv = tiny_argv(trained)
    argv[4] = "--student_options=channels=(4,8,8,16),units=(0,1,0,0),embedding_size=8"
    code, lines = train_main(argv, capsys)
    assert code == 1
    assert len(lines) == 1, lines
    assert "was trained as --student_options=channels=(4, 8, 8, 8)" in lines[0]
    assert "asks for --student_options=channels=(4, 8, 8, 16)" in lines[0]
    assert "new --workdir" in lines[0]
    assert tree_hash(trained) == before
    from kdface.training import restore_run
    assert restore_run(trained).step == 4


def test_rerun_of_a_finished_run_says_where_its_results_are(trained, capsys):
    before = tree_hash(trained)
    # a new learning rate and log frequency are allowed on a rerun; they do not retrain
    code, lines = train_main(tiny_argv(trained, "--learning_rate=0.01", "--log_every=2"),
                             capsys)
    assert code == 0
    assert len(lines) == 1 and "is finished: checkpoint step 4" in lines[0], lines
    assert os.path.join(trained, "logs") in lines[0]
    assert tree_hash(trained) == before


def test_workdir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    code, lines = train_main(tiny_argv(path), capsys)
    assert code == 1 and len(lines) == 1
    assert "is a file" in lines[0] and "--workdir" in lines[0]
    assert path.read_text() == "x"
    code, lines = train_main(tiny_argv(path, "--verbose"), capsys)
    assert code == 1 and lines[0].startswith("Traceback")  # --verbose shows where it came from


def test_student_options_merge_flagfile_and_command_line(tmp_path, capsys):
    from absl import flags

    from kdface import train
    flagfile = tmp_path / "t.flags"
    flagfile.write_text("--student=resnet50\n--student_options=width_divisor=8,"
                        "embedding_size=128\n")
    flags.FLAGS.unparse_flags()
    train.parse_command_line(["prog", f"--flagfile={flagfile}", "--workdir=w",
                              "--train_data=t", "--student_options=embedding_size=64"])
    config = train.config_from_flags()
    note = capsys.readouterr().err.strip().splitlines()
    assert config.student_options == {"width_divisor": 8, "embedding_size": 64}
    assert len(note) == 1
    assert f"width_divisor from {flagfile}" in note[0]
    assert "embedding_size from the command line" in note[0]
    # an empty value clears the flagfile's keys (the ResNet-50 teacher of transfer_pretrain)
    flags.FLAGS.unparse_flags()
    train.parse_command_line(["prog", f"--flagfile={flagfile}", "--workdir=w",
                              "--train_data=t", "--student_options="])
    assert train.config_from_flags().student_options == {}
    flags.FLAGS.unparse_flags()


def test_teacher_that_contradicts_its_checkpoint(trained, tmp_path, capsys):
    code, lines = train_main(tiny_argv(tmp_path / "kd", "--recipe=kd_im", "--teacher=iresnet50",
                                       f"--teacher_checkpoint={trained}"), capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "holds a sphereface_custom" in lines[0] and "--teacher says iresnet50" in lines[0]
    assert not (tmp_path / "kd").exists()


def test_init_checkpoint_of_another_architecture(trained, tmp_path, capsys):
    argv = tiny_argv(tmp_path / "s", f"--init_checkpoint={trained}")
    argv[4] = "--student_options=channels=(4,8,8,16),units=(0,1,0,0),embedding_size=8"
    code, lines = train_main(argv, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "--init_checkpoint" in lines[0] and "holds a sphereface_custom" in lines[0]
    assert "channels=(4, 8, 8, 16)" in lines[0] and "--student_options" in lines[0]
    assert not (tmp_path / "s").exists()


def test_kd_im_embedding_size_mismatch_named_before_anything_runs(trained, tmp_path, capsys):
    # the teacher is a recursive-KD parent (its last generation is the teacher run)
    shutil.copytree(trained, tmp_path / "varg" / "gen_1")
    argv = tiny_argv(tmp_path / "kd", "--recipe=kd_im",
                     f"--teacher_checkpoint={tmp_path / 'varg'}")
    argv[4] = "--student_options=channels=(4,8,8,8),units=(0,1,0,0),embedding_size=16"
    code, lines = train_main(argv, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "embeds in 16" in lines[0] and "in 8" in lines[0]
    assert "--student_options=embedding_size=8" in lines[0]


def test_checkpoint_that_does_not_fit_its_config_is_one_short_line(trained, tmp_path):
    from kdface.training import restore_run
    liar = tmp_path / "liar"
    shutil.copytree(trained, liar)
    config = json.loads((liar / "config.json").read_text())
    config["student_options"] = {**TINY, "channels": [4, 8, 8, 16]}
    (liar / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        restore_run(str(liar))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and len(message) < 600, message
    # the first parameter that differs, and the workdir's own claim
    assert "fc/kernel: checkpoint (8, 8), network (16, 8)" in message
    assert "sphereface_custom" in message


def test_disk_full_during_a_checkpoint_names_the_intact_one(tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    from kdface.training import _run
    monkeypatch.setattr(_run, "resolve_training_data", lambda *a: (encoded_source(), 4))
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = tmp_path / "full"
    code, lines = train_main(tiny_argv(workdir, "--progress"), capsys)
    assert code == 1
    assert "compiling the train step" in lines[0]  # the first step's silent minutes announced
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1, lines
    assert "no space left" in errors[0] and "latest intact checkpoint is step 2" in errors[0]
    from kdface.training import restore_run
    assert restore_run(str(workdir)).step == 2


def test_export_without_onnx_says_how_to_install(trained, tmp_path, capsys, monkeypatch):
    from kdface import export
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    code = export.main(["kdface.export", f"--checkpoint={trained}",
                        f"--out={tmp_path / 's.onnx'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert "pip install 'kdface[onnx]'" in lines[0]
    assert not (tmp_path / "s.onnx").exists()


def test_export_of_a_generations_parent(trained, tmp_path, capsys):
    from kdface import export
    parent = tmp_path / "vargface"
    shutil.copytree(trained, parent / "gen_1")
    out = tmp_path / "s.onnx"
    code = export.main(["kdface.export", f"--checkpoint={parent}", f"--out={out}",
                        "--nocheck"])
    assert code == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["embedding_size"] == TINY["embedding_size"]


def test_unknown_flag_is_a_usage_error(capsys):
    code, lines = train_main(["kdface.train", "--no_such_flag=1"], capsys)
    assert code == 2 and len(lines) <= 2, lines
    assert "no_such_flag" in lines[0]



def test_teacher_checkpoint_whose_weights_do_not_fit_its_config(trained, tmp_path, capsys):
    """A teacher workdir whose config.json was rewritten for another network (what an old
    rerun with another architecture left behind) is named before anything runs."""
    liar = tmp_path / "liar"
    shutil.copytree(trained, liar)
    config = json.loads((liar / "config.json").read_text())
    config["student_options"] = {**TINY, "channels": [4, 8, 8, 16]}
    (liar / "config.json").write_text(json.dumps(config))
    argv = tiny_argv(tmp_path / "kd", "--recipe=pwr", f"--teacher_checkpoint={liar}")
    code, lines = train_main(argv, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "--teacher_checkpoint" in lines[0] and "does not hold the sphereface_custom" in lines[0]
    assert "fc/kernel: checkpoint (8, 8), network (16, 8)" in lines[0]
    assert not (tmp_path / "kd").exists()


def test_missing_teacher_is_named_before_the_data_is_read(tmp_path, capsys):
    code, lines = train_main(tiny_argv(tmp_path / "kd", "--recipe=pwr"), capsys)
    assert code == 1 and len(lines) == 1 and "needs --teacher_checkpoint" in lines[0], lines
    code, lines = train_main(tiny_argv(tmp_path / "kd", "--recipe=pwr",
                                       f"--teacher_checkpoint={tmp_path / 'nope'}"), capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "--teacher_checkpoint" in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "kd").exists()
