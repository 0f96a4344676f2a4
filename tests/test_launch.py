"""The launch scripts: the exact commands their --dry-run prints, argument errors, shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/tpu_vm.sh", "launch/gpu.sh", "launch/slurm.sbatch", "launch/prepare_imagenet.sh"]
COMMON = "launch/common.sh"  # the helpers the scripts share
CONFIG = "configs/convmixer_1536_20.py"
TPU = ["--name", "cm", "--zone", "us-central2-b", "--project", "proj"]
LOC = "--zone=us-central2-b --project=proj"
TRAIN = ["--config", CONFIG, "--workdir", "gs://bkt/runs/cm", "--data-dir", "gs://bkt/tfds"]


def launch(script, *args, env=None):
    """Runs a launch script from the repository root, outside any SLURM job."""
    own = ("SLURM_", "XLA_PYTHON_CLIENT_MEM_FRACTION", "FAKE_STATE")
    base = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return subprocess.run(
        ["bash", script, *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def dry_run(script, *args, env=None):
    """The commands a --dry-run prints, one per line."""
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def line(*argv):
    return "+ " + shlex.join(argv)


def fake_tools(tmp_path, *names):
    """Executables NAME that append their command line (and JAX's memory fraction) to calls.log.

    A fake `gcloud ... describe` answers that the queued resource is in state $FAKE_STATE
    (default ACTIVE).
    """
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        tool = bin_dir / name
        tool.write_text(
            f"#!{sys.executable}\n"
            "import os, shlex, sys\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            "    env = os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')\n"
            "    prefix = [f'XLA_PYTHON_CLIENT_MEM_FRACTION={env}'] if env else []\n"
            "    f.write(shlex.join([*prefix, os.path.basename(sys.argv[0]), *sys.argv[1:]]))\n"
            "    f.write('\\n')\n"
            "if 'describe' in sys.argv:\n"
            "    print(os.environ.get('FAKE_STATE', 'ACTIVE'))\n"
        )
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}, log


def test_tpu_all_on_a_v4_32_pod_slice(tmp_path):
    lines = dry_run(
        "launch/tpu_vm.sh",
        "all",
        *TPU,
        "--accelerator",
        "v4-32",
        *TRAIN,
        "--",
        "--config.batch_size=1024",
        "--config.model.name=it's",
        env={"TMPDIR": str(tmp_path)},
    )
    tarball = f"{tmp_path}/convmixer_jax-cm.tar.gz"
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cm", *LOC.split(), "--worker=all"]
    setup = (
        "set -e; rm -rf ~/convmixer_jax; mkdir -p ~/convmixer_jax; "
        "tar -xzf ~/convmixer_jax.tar.gz -C ~/convmixer_jax; "
        "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv; "
        "~/.local/bin/uv venv -q --clear --python 3.11 ~/convmixer_venv; cd ~/convmixer_jax; "
        '~/.local/bin/uv pip install -q --python ~/convmixer_venv/bin/python -e ".[tpu]"'
    )
    train = (
        "cd ~/convmixer_jax || exit 1; nohup ~/convmixer_venv/bin/python -m convmixer_jax.main "
        f"--multihost --config {CONFIG} --workdir gs://bkt/runs/cm --config.data_dir=gs://bkt/tfds "
        "--config.batch_size=1024 '--config.model.name=it'\"'\"'s' "
        "> ~/convmixer_train.log 2>&1 < /dev/null & echo $! > ~/convmixer_train.pid"
    )
    assert lines == [
        f"+ gcloud compute tpus tpu-vm create cm {LOC} --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base",
        line(
            "tar",
            "-czf",
            tarball,
            "--exclude=.git",
            "--exclude=.venv",
            "--exclude=.venv-aot",
            "--exclude=__pycache__",
            "--exclude=*.egg-info",
            "--exclude=.pytest_cache",
            "--exclude=.ruff_cache",
            "--exclude=runs",
            "-C",
            str(REPO),
            ".",
        ),  # fmt: skip
        f"+ gcloud compute tpus tpu-vm scp {tarball} cm:convmixer_jax.tar.gz {LOC} --worker=all",
        line(*ssh, f"--command={setup}"),
        line(*ssh, f"--command={train}"),
        f"+ gcloud compute tpus tpu-vm ssh cm {LOC} --worker=0 "
        "'--command=tail -n 200 -F ~/convmixer_train.log'",
    ]
    # What every worker's shell runs: main with the overrides passed through word for word.
    remote = shlex.split(shlex.split(lines[4][2:])[-1].removeprefix("--command="))
    main = remote[remote.index("nohup") + 1 : remote.index(">")]
    assert main == [
        "~/convmixer_venv/bin/python", "-m", "convmixer_jax.main", "--multihost",
        "--config", CONFIG,
        "--workdir", "gs://bkt/runs/cm", "--config.data_dir=gs://bkt/tfds",
        "--config.batch_size=1024", "--config.model.name=it's",
    ]  # fmt: skip


def test_tpu_create_v5p_spot_without_project():
    lines = dry_run(
        "launch/tpu_vm.sh", "create", "--name=big", "--zone=us-east5-a", "--accelerator=v5p-128",
        "--spot",
    )  # fmt: skip
    assert lines == [
        "+ gcloud compute tpus tpu-vm create big --zone=us-east5-a --accelerator-type=v5p-128 "
        "--version=v2-alpha-tpuv5 --spot"
    ]


def test_tpu_queued_resources_create_waits_and_delete_forces():
    args = ["--name", "cm", "--zone", "us-east5-a", "--project", "proj", "--queued", "--spot"]
    created = dry_run("launch/tpu_vm.sh", "create", *args, "--accelerator", "v5p-64")
    deleted = dry_run("launch/tpu_vm.sh", "delete", *args)
    loc = "--zone=us-east5-a --project=proj"
    assert created == [
        f"+ gcloud compute tpus queued-resources create cm {loc} --node-id=cm "
        "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot",
        f"+ gcloud compute tpus queued-resources describe cm {loc} '--format=value(state.state)'",
    ]
    assert deleted == [f"+ gcloud compute tpus queued-resources delete cm {loc} --force --quiet"]


def test_tpu_all_runs_what_dry_run_prints(tmp_path):
    env, log = fake_tools(tmp_path, "gcloud")
    args = ["all", *TPU, "--queued", "--accelerator", "v4-32", *TRAIN]
    printed = dry_run("launch/tpu_vm.sh", *args, env=env)
    result = launch("launch/tpu_vm.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == printed
    gcloud_calls = [p[2:] for p in printed if p.startswith("+ gcloud ")]
    assert log.read_text().splitlines() == gcloud_calls
    with tarfile.open(tmp_path / "convmixer_jax-cm.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"./{CONFIG}", "./convmixer_jax/main.py", "./setup.cfg"} <= names
    assert not any(n.startswith(("./.venv", "./.git/")) or "__pycache__" in n for n in names)


def test_tpu_queued_resource_that_fails_stops_the_launch(tmp_path):
    env, log = fake_tools(tmp_path, "gcloud")
    args = ["all", *TPU, "--queued", "--accelerator", "v4-32", *TRAIN]
    result = launch("launch/tpu_vm.sh", *args, env={**env, "FAKE_STATE": "FAILED"})
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: queued resource cm is FAILED"
    assert [c.split()[4] for c in log.read_text().splitlines()] == ["create", "describe"]


@pytest.mark.parametrize(
    "accelerator, extra, version",
    [
        ("v3-8", [], "tpu-ubuntu2204-base"),
        ("v5litepod-16", [], "v2-alpha-tpuv5-lite"),
        ("v6e-8", [], "v2-alpha-tpuv6e"),
        ("v4-8", ["--version", "tpu-vm-base"], "tpu-vm-base"),
        ("v9x-8", ["--version", "v2-alpha-tpuv9"], "v2-alpha-tpuv9"),
    ],
)
def test_tpu_runtime_version_follows_the_accelerator(accelerator, extra, version):
    lines = dry_run("launch/tpu_vm.sh", "create", *TPU, "--accelerator", accelerator, *extra)
    assert lines == [
        f"+ gcloud compute tpus tpu-vm create cm {LOC} --accelerator-type={accelerator} "
        f"--version={version}"
    ]


def test_tpu_logs_stop_and_delete():
    ssh = f"+ gcloud compute tpus tpu-vm ssh cm {LOC}"
    assert dry_run("launch/tpu_vm.sh", "logs", *TPU, "--worker", "3") == [
        f"{ssh} --worker=3 '--command=tail -n 200 -F ~/convmixer_train.log'"
    ]
    assert dry_run("launch/tpu_vm.sh", "stop", *TPU) == [
        f"{ssh} --worker=all '--command=kill -TERM \"$(cat ~/convmixer_train.pid)\"'"
    ]
    assert dry_run("launch/tpu_vm.sh", "delete", *TPU) == [
        f"+ gcloud compute tpus tpu-vm delete cm {LOC} --quiet"
    ]


def test_gpu_host_with_eight_gpus():
    lines = dry_run(
        "launch/gpu.sh", "--python", ".venv/bin/python", "--config", CONFIG, "--workdir",
        "runs/cm 1536", "--data-dir", "/data/tfds", "--", "--config.batch_size=1024",
    )  # fmt: skip
    assert lines == [
        f"+ .venv/bin/python -m pip install -q -e '{REPO}[cuda]'",
        "+ env XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 .venv/bin/python -m convmixer_jax.main "
        f"--config {CONFIG} --workdir 'runs/cm 1536' --config.data_dir=/data/tfds "
        "--config.batch_size=1024",
    ]


def test_gpu_runs_what_dry_run_prints(tmp_path):
    env, log = fake_tools(tmp_path, "python")
    args = ["--python", "python", "--mem-fraction", "0.7", "--config", CONFIG, "--workdir", "w"]
    printed = dry_run("launch/gpu.sh", *args, env=env)
    result = launch("launch/gpu.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == printed
    assert log.read_text().splitlines() == [
        f"python -m pip install -q -e '{REPO}[cuda]'",
        f"XLA_PYTHON_CLIENT_MEM_FRACTION=0.7 python -m convmixer_jax.main --config {CONFIG} "
        "--workdir w",
    ]


def test_gpu_subset_without_install_or_data_dir():
    lines = dry_run(
        "launch/gpu.sh", "--no-install", "--gpus", "0,1,2,3", "--mem-fraction", "0.8",
        "--config", CONFIG, "--workdir", "gs://bkt/runs/cm",
    )  # fmt: skip
    assert lines == [
        "+ env CUDA_VISIBLE_DEVICES=0,1,2,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 python3 -m "
        f"convmixer_jax.main --config {CONFIG} --workdir gs://bkt/runs/cm"
    ]


def test_slurm_two_nodes_submits_itself_then_runs_one_process_per_gpu():
    training = ["--config", CONFIG, "--workdir", "/shared/runs/cm", "--data-dir", "/shared/tfds"]
    submitted = dry_run(
        "launch/slurm.sbatch", "--nodes", "2", "--partition", "gpu", "--time", "48:00:00",
        "--python", ".venv/bin/python", *training, "--", "--config.batch_size=1024",
    )  # fmt: skip
    assert submitted == [
        "+ sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu "
        f"--time=48:00:00 launch/slurm.sbatch --config {CONFIG} --workdir /shared/runs/cm "
        "--python .venv/bin/python --data-dir /shared/tfds -- --config.batch_size=1024"
    ]
    # What the job runs with the arguments it was submitted with.
    submission = shlex.split(submitted[0])
    job_args = submission[submission.index("launch/slurm.sbatch") + 1 :]
    assert dry_run("launch/slurm.sbatch", *job_args, env={"SLURM_JOB_ID": "42"}) == [
        "+ srun --kill-on-bad-exit=1 .venv/bin/python -m convmixer_jax.main "
        f"--config {CONFIG} --workdir /shared/runs/cm --config.data_dir=/shared/tfds "
        "--config.batch_size=1024"
    ]


def test_slurm_runs_what_dry_run_prints(tmp_path):
    env, log = fake_tools(tmp_path, "sbatch", "srun")
    args = ["--nodes", "2", "--config", CONFIG, "--workdir", "w"]
    assert launch("launch/slurm.sbatch", *args, env=env).returncode == 0
    job_args = ["--config", CONFIG, "--workdir", "w"]
    job = launch("launch/slurm.sbatch", *job_args, env={**env, "SLURM_JOB_ID": "42"})
    assert job.returncode == 0, job.stderr
    assert log.read_text().splitlines() == [
        "sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/slurm.sbatch "
        f"--config {CONFIG} --workdir w --python python3",
        f"srun --kill-on-bad-exit=1 python3 -m convmixer_jax.main --config {CONFIG} --workdir w",
    ]


def test_slurm_gpus_per_node_sets_tasks_per_node():
    lines = dry_run(
        "launch/slurm.sbatch", "--nodes", "4", "--gpus-per-node", "4", "--account", "ml",
        "--config", CONFIG, "--workdir", "/shared/runs/cm",
    )  # fmt: skip
    assert lines == [
        "+ sbatch --nodes=4 --ntasks-per-node=4 --gpus-per-node=4 --account=ml "
        f"launch/slurm.sbatch --config {CONFIG} --workdir /shared/runs/cm --python python3"
    ]


def test_prepare_imagenet_builds_with_tfds_then_syncs_to_gcs(tmp_path):
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (tmp_path / name).touch()
    lines = dry_run(
        "launch/prepare_imagenet.sh", "--manual-dir", str(tmp_path), "--data-dir", "/disk/tfds/",
        "--gcs-dir", "gs://bkt/tfds",
    )  # fmt: skip
    assert len(lines) == 2
    prepare = shlex.split(lines[0][2:])
    assert prepare[:2] == ["python3", "-c"] and prepare[3:] == [str(tmp_path), "/disk/tfds/"]
    code = prepare[2]
    compile(code, "<prepare>", "exec")
    assert 'tfds.builder("imagenet2012", data_dir=sys.argv[2])' in code
    assert "DownloadConfig(manual_dir=sys.argv[1])" in code
    assert lines[1] == (
        "+ gcloud storage rsync --recursive /disk/tfds/imagenet2012 gs://bkt/tfds/imagenet2012"
    )


@pytest.mark.parametrize(
    "script, args, env, message",
    [
        ("launch/tpu_vm.sh", [*TPU], {}, "error: missing command: create, setup, train"),
        ("launch/tpu_vm.sh", ["start", *TPU], {}, "error: unknown command start: use create"),
        ("launch/tpu_vm.sh", ["delete", "--zone", "z"], {}, "error: --name is required"),
        ("launch/tpu_vm.sh", ["delete", "--name", "cm"], {}, "error: --zone is required"),
        ("launch/tpu_vm.sh", ["delete", "--name"], {}, "error: --name needs a value"),
        ("launch/tpu_vm.sh", ["create", *TPU], {}, "error: create needs --accelerator"),
        (
            "launch/tpu_vm.sh",
            ["create", *TPU, "--accelerator", "v4_32"],
            {},
            "error: --accelerator v4_32 is not an accelerator type",
        ),
        (
            "launch/tpu_vm.sh",
            ["create", *TPU, "--accelerator", "v9x-8"],
            {},
            "error: no default runtime version for v9x-8; pass --version",
        ),
        (
            "launch/tpu_vm.sh",
            ["train", *TPU, *TRAIN[:2], "--workdir", "runs/cm", *TRAIN[4:]],
            {},
            "error: --workdir must be a gs:// URL",
        ),
        (
            "launch/tpu_vm.sh",
            ["all", *TPU, "--accelerator", "v4-32", "--config", "configs/nope.py", *TRAIN[2:]],
            {},
            "error: --config configs/nope.py is not a file",
        ),
        ("launch/tpu_vm.sh", ["logs", *TPU, "--worker", "x"], {}, "error: --worker x is not"),
        ("launch/tpu_vm.sh", ["delete", *TPU, "--zones", "z"], {}, "error: unknown option --zones"),
        ("launch/tpu_vm.sh", ["delete", "delete", *TPU], {}, "error: unexpected argument delete"),
        ("launch/gpu.sh", ["--workdir", "runs/x"], {}, "error: --config is required"),
        ("launch/gpu.sh", ["--config", CONFIG], {}, "error: --workdir is required"),
        (
            "launch/gpu.sh",
            ["--config", CONFIG, "--workdir", "w", "--gpus", "0-7"],
            {},
            "error: --gpus 0-7 is not a list",
        ),
        (
            "launch/gpu.sh",
            ["--config", CONFIG, "--workdir", "w", "--mem-fraction", "1.5"],
            {},
            "error: --mem-fraction 1.5 is not a number in (0, 1]",
        ),
        (
            "launch/slurm.sbatch",
            ["--config", CONFIG, "--workdir", "w"],
            {},
            "error: --nodes is required to submit",
        ),
        (
            "launch/slurm.sbatch",
            ["--nodes", "0", "--config", CONFIG, "--workdir", "w"],
            {},
            "error: --nodes 0 is not a positive integer",
        ),
        (
            "launch/slurm.sbatch",
            ["--nodes", "2", "--config", CONFIG, "--workdir", "w"],
            {"SLURM_JOB_ID": "42"},
            "error: --nodes applies only when submitting",
        ),
        (
            "launch/prepare_imagenet.sh",
            ["--manual-dir", "/nonexistent", "--data-dir", "d"],
            {},
            "error: /nonexistent/ILSVRC2012_img_train.tar not found",
        ),
    ],
)
def test_bad_arguments_give_one_line_error(script, args, env, message):
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_executable(script):
    result = launch(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: {script} ")
    assert "--dry-run" in result.stdout
    assert os.access(REPO / script, os.X_OK)


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck")
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir())
    assert files == sorted([*SCRIPTS, COMMON])
    result = subprocess.run(
        ["shellcheck", "--shell=bash", "--external-sources", COMMON, *SCRIPTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_slurm_holds_the_shared_helpers_verbatim():
    # sbatch runs a copy of the job script alone, so slurm.sbatch cannot source common.sh.
    helpers = (REPO / COMMON).read_text().split("\n\n", 1)[1]
    assert helpers.startswith("die() {") and helpers.endswith("}\n")
    assert helpers in (REPO / "launch/slurm.sbatch").read_text()
    for script in set(SCRIPTS) - {"launch/slurm.sbatch"}:
        text = (REPO / script).read_text()
        assert "\ndie() {" not in text
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text
