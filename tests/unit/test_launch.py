"""Launch scripts (launch/), the Docker files (docker/) and their install script.

Most tests run a script with --dry-run and read the one command line it prints; a fake
`nvidia-smi` on PATH decides how many GPUs the script sees, fake `scontrol`/`srun` stand in for
SLURM. Two tests really start torchrun with a tiny probe module (not moe_dist: these tests must
pass before and without the package). Linters run when their binaries are installed
(`docker/install.sh --dev` installs them), else the test is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

LAUNCH = ROOT / "launch"
DOCKER = ROOT / "docker"
SCRIPTS = [
    LAUNCH / "common.sh",
    LAUNCH / "torchrun_single_node.sh",
    LAUNCH / "torchrun_multi_node.sh",
    LAUNCH / "mpirun.sh",
    LAUNCH / "slurm_example.sbatch",
    DOCKER / "install.sh",
    DOCKER / "entrypoint.sh",
]
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
MULTI_NODE_ENV = {"MASTER_ADDR": "node0", "NNODES": "2", "NODE_RANK": "0", "NPROC_PER_NODE": "8"}

# Variables of the caller's shell that would change what the scripts print.
_SCRUB = re.compile(
    r"^(NCCL_|NVSHMEM_|TORCH_NCCL_|TORCH_SYMM_MEM_|MOE_DIST_|SLURM_|OMPI_|PMIX_)|^(NPROC|NP|MODULE|"
    r"PYTHON|TORCHRUN|MPIRUN|MPIRUN_ARGS|HOSTS|HOSTFILE|DRY_RUN|MASTER_ADDR|MASTER_PORT|NNODES|"
    r"NODE_RANK|NPROC_PER_NODE|RDZV_ID|OMP_NUM_THREADS|CUDA_VISIBLE_DEVICES|PYTHONPATH)$"
)


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    """A PATH entry whose nvidia-smi finds no GPU (so results don't depend on the machine)."""
    d = tmp_path / "bin"
    d.mkdir()
    _write_exe(d / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    return d


def _gpus(fakebin: Path, n: int) -> None:
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(n))
    _write_exe(fakebin / "nvidia-smi", f"#!/bin/sh\nprintf '{lines}'\n")


def run(cmd, fakebin: Path, env: dict | None = None, cwd: Path = ROOT, timeout: float = 60):
    base = {k: v for k, v in os.environ.items() if not _SCRUB.search(k)}
    base["PATH"] = f"{fakebin}{os.pathsep}{base.get('PATH', '')}"
    base.update(env or {})
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout
    )


def dry(script: Path, fakebin: Path, *args: str, env: dict | None = None):
    """Runs `script --dry-run args`; returns (env assignments, argv) of the printed command."""
    p = run(["bash", script, "--dry-run", *args], fakebin, env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    return parse(lines[0])


def parse(line: str):
    words = shlex.split(line)
    assigned = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        k, _, v = words.pop(0).partition("=")
        assigned[k] = v
    return assigned, words


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def check_runtime_env(assigned: dict) -> None:
    for k, v in MULTICAST_OFF.items():
        assert assigned.get(k) == v, (k, assigned)
    assert assigned["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert assigned["NVSHMEM_SYMMETRIC_SIZE"] == "2G"
    assert int(assigned["OMP_NUM_THREADS"]) >= 1
    assert assigned["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


# --- torchrun_single_node.sh -------------------------------------------------------------------


def test_single_node_without_gpus_runs_two_cpu_processes(fakebin):
    assigned, argv = dry(LAUNCH / "torchrun_single_node.sh", fakebin, "--ep", "2", "--steps", "3")
    check_runtime_env(assigned)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in argv
    assert opt(argv, "--nproc-per-node") == "2"
    assert argv[-6:] == ["-m", "moe_dist.lm.train", "--ep", "2", "--steps", "3"]


@pytest.mark.parametrize(
    "env, expected",
    [({}, "8"), ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"), ({"NPROC": "4"}, "4")],
)
def test_single_node_uses_gpus_found(fakebin, env, expected):
    _gpus(fakebin, 8)
    _, argv = dry(LAUNCH / "torchrun_single_node.sh", fakebin, env=env)
    assert opt(argv, "--nproc-per-node") == expected


def test_single_node_overrides_and_forced_variables(fakebin):
    env = {
        "MODULE": "benchmarks.probe",
        "TORCHRUN": "torchrun",
        "NVSHMEM_SYMMETRIC_SIZE": "8G",
        "NCCL_DEBUG": "INFO",
        "NCCL_NVLS_ENABLE": "1",  # multicast must stay off whatever the caller says
        "OMP_NUM_THREADS": "7",
    }
    assigned, argv = dry(LAUNCH / "torchrun_single_node.sh", fakebin, "--", "--help", env=env)
    assert assigned["NCCL_NVLS_ENABLE"] == "0"
    assert assigned["NVSHMEM_SYMMETRIC_SIZE"] == "8G"
    assert assigned["NCCL_DEBUG"] == "INFO"
    assert assigned["OMP_NUM_THREADS"] == "7"
    assert argv[0] == "torchrun"
    assert argv[-3:] == ["-m", "benchmarks.probe", "--help"]  # after `--`, --help is the trainer's


def test_single_node_quotes_arguments(fakebin):
    _, argv = dry(LAUNCH / "torchrun_single_node.sh", fakebin, "--name", "it's a run", "")
    assert argv[-3:] == ["--name", "it's a run", ""]


def test_dry_run_by_environment(fakebin):
    p = run(["bash", LAUNCH / "torchrun_single_node.sh", "--ep", "2"], fakebin, {"DRY_RUN": "1"})
    assert p.returncode == 0, p.stderr
    assert parse(p.stdout)[1][-2:] == ["--ep", "2"]


def test_single_node_help_and_bad_values(fakebin):
    p = run(["bash", LAUNCH / "torchrun_single_node.sh", "--help"], fakebin)
    assert p.returncode == 0 and "--dry-run" in p.stdout and "NPROC" in p.stdout
    p = run(["bash", LAUNCH / "torchrun_single_node.sh", "--dry-run"], fakebin, {"NPROC": "0"})
    assert p.returncode != 0 and "NPROC" in p.stderr
    p = run(
        ["bash", LAUNCH / "torchrun_single_node.sh", "--dry-run"],
        fakebin,
        {"MOE_DIST_NVSHMEM_BOOTSTRAP": "tcp"},
    )
    assert p.returncode != 0 and "MOE_DIST_NVSHMEM_BOOTSTRAP" in p.stderr


# --- torchrun_multi_node.sh --------------------------------------------------------------------


def test_multi_node_rendezvous(fakebin):
    script = LAUNCH / "torchrun_multi_node.sh"
    assigned, argv = dry(script, fakebin, "--ep", "16", env=MULTI_NODE_ENV)
    check_runtime_env(assigned)
    assert opt(argv, "--rdzv-backend") == "c10d"
    assert opt(argv, "--rdzv-endpoint") == "node0:29500"
    assert opt(argv, "--nnodes") == "2"
    assert opt(argv, "--nproc-per-node") == "8"
    assert opt(argv, "--rdzv-conf") == "is_host=true"
    assert "--standalone" not in argv
    assert argv[-4:] == ["-m", "moe_dist.lm.train", "--ep", "16"]

    env = {**MULTI_NODE_ENV, "NODE_RANK": "1", "MASTER_PORT": "1234", "SLURM_JOB_ID": "42"}
    assigned, argv = dry(LAUNCH / "torchrun_multi_node.sh", fakebin, env=env)
    assert opt(argv, "--rdzv-endpoint") == "node0:1234"
    assert opt(argv, "--rdzv-conf") == "is_host=false"
    assert opt(argv, "--rdzv-id") == "42"
    assert assigned["MASTER_ADDR"] == "node0" and assigned["MASTER_PORT"] == "1234"


@pytest.mark.parametrize("missing", sorted(MULTI_NODE_ENV))
def test_multi_node_names_missing_variable(fakebin, missing):
    env = {k: v for k, v in MULTI_NODE_ENV.items() if k != missing}
    p = run(["bash", LAUNCH / "torchrun_multi_node.sh", "--dry-run"], fakebin, env)
    assert p.returncode != 0
    assert p.stdout == ""
    assert f"missing environment variable(s): {missing}" in p.stderr


def test_multi_node_rejects_node_rank_out_of_range(fakebin):
    env = {**MULTI_NODE_ENV, "NODE_RANK": "2"}
    p = run(["bash", LAUNCH / "torchrun_multi_node.sh", "--dry-run"], fakebin, env)
    assert p.returncode != 0 and "NODE_RANK" in p.stderr


# --- mpirun.sh ---------------------------------------------------------------------------------


def test_mpirun_single_host(fakebin):
    env = {"NCCL_DEBUG": "WARN", "MOE_DIST_NVSHMEM_BOOTSTRAP": "mpi", "NVSHMEM_DEBUG": "1"}
    assigned, argv = dry(LAUNCH / "mpirun.sh", fakebin, "--ep", "2", env=env)
    check_runtime_env(assigned)
    assert argv[0] == "mpirun"
    assert opt(argv, "-np") == "2"
    assert opt(argv, "--bind-to") == "none"
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert "--host" not in argv and "--hostfile" not in argv
    assert assigned["MASTER_ADDR"] == "localhost" and assigned["MASTER_PORT"] == "29500"
    exported = {argv[i + 1] for i, w in enumerate(argv) if w == "-x"}
    wanted = {*MULTICAST_OFF, "MASTER_ADDR", "MASTER_PORT", "NVSHMEM_SYMMETRIC_SIZE", "NCCL_DEBUG"}
    wanted |= {"MOE_DIST_NVSHMEM_BOOTSTRAP", "NVSHMEM_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    assert wanted <= exported
    assert argv[-5:] == ["python3", "-m", "moe_dist.lm.train", "--ep", "2"]


def test_mpirun_hosts(fakebin, tmp_path):
    env = {"HOSTS": "node0:8,node1:8", "NP": "16"}
    assigned, argv = dry(LAUNCH / "mpirun.sh", fakebin, env=env)
    assert opt(argv, "-np") == "16" and opt(argv, "--host") == "node0:8,node1:8"
    assert assigned["MASTER_ADDR"] == "node0"

    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the nodes\n\nnodeA slots=8\nnodeB slots=8\n")
    env = {"HOSTFILE": str(hostfile), "MASTER_PORT": "4242", "MPIRUN_ARGS": "--mca btl ^openib"}
    assigned, argv = dry(LAUNCH / "mpirun.sh", fakebin, env=env)
    assert opt(argv, "--hostfile") == str(hostfile)
    assert assigned["MASTER_ADDR"] == "nodeA" and assigned["MASTER_PORT"] == "4242"
    assert opt(argv, "--mca") == "btl"


def test_mpirun_without_mpirun_says_so(fakebin):
    env = {"MPIRUN": "/nonexistent/mpirun"}
    p = run(["bash", LAUNCH / "mpirun.sh"], fakebin, env)
    assert p.returncode != 0 and "not found" in p.stderr and "Open MPI" in p.stderr


# --- slurm_example.sbatch ----------------------------------------------------------------------


def _fake_slurm(fakebin: Path) -> None:
    _write_exe(fakebin / "scontrol", "#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    # srun: drop its options, then run the task once per node with that node's SLURM_NODEID.
    _write_exe(
        fakebin / "srun",
        '#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\n'
        'for i in 0 1; do SLURM_NODEID=$i "$@" || exit; done\n',
    )


def test_slurm_example(fakebin):
    _fake_slurm(fakebin)
    env = {
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "99",
    }
    p = run(["bash", LAUNCH / "slurm_example.sbatch", "--dry-run", "--ep", "16"], fakebin, env)
    assert p.returncode == 0, p.stderr
    nodes = [parse(line) for line in p.stdout.strip().splitlines()]
    assert len(nodes) == 2
    for (assigned, argv), is_host in zip(nodes, ["true", "false"]):
        check_runtime_env(assigned)
        assert assigned["MASTER_ADDR"] == "gpu-node-07"
        assert opt(argv, "--rdzv-endpoint") == "gpu-node-07:29500"
        assert opt(argv, "--nnodes") == "2" and opt(argv, "--nproc-per-node") == "8"
        assert opt(argv, "--rdzv-id") == "99"
        assert opt(argv, "--rdzv-conf") == f"is_host={is_host}"
        assert argv[-2:] == ["--ep", "16"]
    text = (LAUNCH / "slurm_example.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in text and "scontrol show hostnames" in text


def test_slurm_example_outside_slurm(fakebin):
    p = run(["bash", LAUNCH / "slurm_example.sbatch", "--dry-run"], fakebin)
    assert p.returncode != 0 and "SLURM_JOB_NODELIST" in p.stderr


# --- docker/entrypoint.sh ----------------------------------------------------------------------


def test_entrypoint(fakebin):
    entry = DOCKER / "entrypoint.sh"
    _, argv = parse(run([entry, "--dry-run", "--ep", "2"], fakebin).stdout)
    assert "--standalone" in argv and argv[-2:] == ["--ep", "2"]
    p = run([entry, "bash", "-c", "echo passthrough"], fakebin)
    assert p.returncode == 0 and p.stdout == "passthrough\n"
    p = run([entry, "multi-node", "--dry-run"], fakebin)
    assert p.returncode != 0 and "MASTER_ADDR" in p.stderr
    _, argv = parse(run([entry, "mpirun", "--dry-run"], fakebin).stdout)
    assert argv[0] == "mpirun"


# --- real runs: torchrun with a probe module ---------------------------------------------------

# Each rank writes what it sees to its own file (ranks sharing one stdout interleave their lines).
PROBE = """import os, pathlib
keys = ["RANK", "WORLD_SIZE", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
        "NVSHMEM_DISABLE_NVLS", "NVSHMEM_SYMMETRIC_SIZE"]
out = pathlib.Path(os.environ["PROBE_DIR"]) / ("rank" + os.environ["RANK"])
out.write_text(" ".join(os.environ.get(k, "-") for k in keys))
"""


@pytest.fixture
def probe(tmp_path):
    if importlib.util.find_spec("torch") is None:  # find_spec: importing torch here costs a second
        pytest.skip("torch is needed to start torchrun")
    (tmp_path / "launch_probe.py").write_text(PROBE)
    (tmp_path / "out").mkdir()
    return {
        "MODULE": "launch_probe",
        "PYTHONPATH": str(tmp_path),
        "PYTHON": sys.executable,
        "PROBE_DIR": str(tmp_path / "out"),
    }


def _probe_lines(probe: dict):
    return sorted(f.read_text().split() for f in Path(probe["PROBE_DIR"]).iterdir())


@pytest.mark.slow
def test_single_node_really_starts_two_processes(fakebin, probe):
    p = run(["bash", LAUNCH / "torchrun_single_node.sh"], fakebin, probe)
    assert p.returncode == 0, p.stderr
    assert _probe_lines(probe) == [[r, "2", "0", "1", "1", "2G"] for r in ("0", "1")]


@pytest.mark.slow
def test_multi_node_really_meets_on_localhost(fakebin, probe):
    env = {
        **probe,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ID": "test_launch",
    }
    base = {k: v for k, v in os.environ.items() if not _SCRUB.search(k)}
    base["PATH"] = f"{fakebin}{os.pathsep}{base['PATH']}"
    procs = [
        subprocess.Popen(
            ["bash", str(LAUNCH / "torchrun_multi_node.sh")],
            cwd=ROOT,
            env={**base, **env, "NODE_RANK": str(n)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 0)  # the non-host first: it must wait for the store, not fail
    ]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=90)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
    assert _probe_lines(probe) == [[r, "2", "0", "1", "1", "2G"] for r in ("0", "1")]


# --- docker/install.sh -------------------------------------------------------------------------

PINS = ["nvshmem4py-cu13==0.4.1", "deepspeed==0.19.8", "mpi4py==", "matplotlib==", "pytest=="]


def test_install_help_lists_pins(fakebin):
    p = run(["bash", DOCKER / "install.sh", "--help"], fakebin)
    assert p.returncode == 0
    for pin in PINS:
        assert pin in p.stdout
    assert "MOE_DIST_CPU_ONLY" in p.stdout


def test_install_dry_run(fakebin):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("install.sh requires an importable torch")
    env = {"PYTHON": sys.executable}
    p = run(["bash", DOCKER / "install.sh", "--dry-run"], fakebin, env)
    assert p.returncode == 0, p.stderr
    pips = [line for line in p.stdout.splitlines() if line.startswith("+ ")]
    for pin in PINS:
        assert any(pin in line for line in pips), pin
    assert all(" -c " in line for line in pips)  # every pip call is constrained to torch
    held = re.search(r"^# .* holds: (.*)$", p.stdout, re.M).group(1).split()
    assert held[0].startswith("torch==") and "deepspeed==0.19.8" in held
    for line in pips:  # torch itself is never asked for
        words = shlex.split(line[2:])
        assert not [w for w in words[words.index("-c") + 2 :] if re.match(r"torch\b", w)], line
    assert pips[-1].endswith(f"-e {ROOT}[train,test,bench,mpi,interop,gpu]")

    p = run(
        ["bash", DOCKER / "install.sh", "--dry-run", "--no-editable"],
        fakebin,
        {**env, "MOE_DIST_CPU_ONLY": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert "nvshmem4py" not in p.stdout and "deepspeed==0.19.8" in p.stdout
    assert (
        p.stdout.rstrip().endswith(f" {ROOT}[train,test,bench,mpi,interop]")
        and " -e " not in p.stdout
    )


def test_install_refuses_without_torch(fakebin, tmp_path):
    # -S hides site-packages, so this interpreter has no torch.
    wrapper = f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n'
    no_torch = _write_exe(tmp_path / "python-no-torch", wrapper)
    p = run(["bash", DOCKER / "install.sh", "--dry-run"], fakebin, {"PYTHON": str(no_torch)})
    assert p.returncode != 0
    assert "torch is not importable" in p.stderr and "+ " not in p.stdout
    p = run(["bash", DOCKER / "install.sh", "--bogus"], fakebin)
    assert p.returncode != 0 and "--bogus" in p.stderr


# --- static checks and linters -----------------------------------------------------------------


def test_dockerfile_and_readme():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest")
    assert "RUN bash docker/install.sh" in text
    assert 'ENTRYPOINT ["/workspace/moe_dist/docker/entrypoint.sh"]' in text
    for k, v in MULTICAST_OFF.items():
        assert f"{k}={v}" in text
    readme = (DOCKER / "README.md").read_text()
    assert (
        "docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 "
        "--network host --rm -it moe_dist:latest" in readme
    )


def test_scripts_are_executable_and_parse():
    for script in SCRIPTS:
        if script.suffix == ".sh" and script.name != "common.sh":
            assert os.access(script, os.X_OK), f"{script} is not executable"
        text = script.read_text()
        assert "set -euo pipefail" in text or script.name == "common.sh", script
        p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} is not installed (docker/install.sh --dev installs it from PyPI)")
    return found


def test_shellcheck():
    shellcheck = _tool("shellcheck")
    cmd = [shellcheck, "-x", *map(str, SCRIPTS)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_hadolint():
    hadolint = _tool("hadolint")
    p = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
