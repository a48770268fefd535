"""Two single-process "nodes" (two torchrun launches joined by a c10d rendezvous over loopback, gloo on CPU)
train exactly as one process with the same global batch, write checkpoints once, and their checkpoint
resumes in one process."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddp_utils import free_port, max_loss_diff, max_weight_diff, read_log, write_config

TIMEOUT = 120  # seconds for any one launch; the nodes are killed together past it


def run_nodes(commands: list[list[str]], env: dict, logs) -> None:
    """Start every command in its own process group (output to ``logs/node<i>.txt``) and wait for all; if
    one fails or time runs out, kill every group (the torchrun agents and their workers) and report."""
    logs.mkdir(exist_ok=True)
    paths = [logs / f"node{i}.txt" for i in range(len(commands))]
    procs = []
    for cmd, path in zip(commands, paths):
        with open(path, "w") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # the whole group: a torchrun agent's workers too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(f"--- node {i} (exit {p.returncode})\n{path.read_text()[-3000:]}"
                           for i, (p, path) in enumerate(zip(procs, paths)))
        raise AssertionError(f"a node failed or ran past {TIMEOUT} s:\n{report}")


@pytest.mark.slow
def test_two_nodes_train_as_one_process_and_resume_on_one(tmp_path):
    from detkit.data.synth import synthesize

    synthesize(str(tmp_path / "data"), "coco", 8, seed=5, image_size=(96, 128))

    def config(work, batch):
        return write_config(tmp_path, tmp_path / "data", work, batch, eval_at_end=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes_cfg = config(tmp_path / "nodes", 1)
    port = free_port()
    run_nodes([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", f"detkit-test-{port}", "tools/train.py", str(nodes_cfg), "--no-progress"]
               for node in (0, 1)], env, tmp_path / "logs_nodes")
    run_nodes([[sys.executable, "tools/train.py", str(config(tmp_path / "single", 2)), "--no-progress"]], env,
              tmp_path / "logs_single")

    # (a) Two nodes x batch 1 train exactly as one process x batch 2.
    nodes_log, one_log = read_log(tmp_path / "nodes"), read_log(tmp_path / "single")
    loss_diff = max_loss_diff(nodes_log, one_log)
    weight_diff = max_weight_diff(tmp_path / "nodes" / "final.pth", tmp_path / "single" / "final.pth")
    print(f"2 nodes vs 1 process: max loss difference {loss_diff:.2g}, max weight difference {weight_diff:.2g}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-6

    # (b) Written once, by rank 0: one log line per iteration, one set of checkpoints.
    assert [r["iter"] for r in nodes_log] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "nodes").glob("*.pth")) == ["final.pth", "iter_0000002.pth"]
    ckpt = torch.load(tmp_path / "nodes" / "iter_0000002.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["samples_seen"] == 4

    # (c) The two-node checkpoint of iteration 2 resumes in one process; iterations 3-4 repeat the
    # uninterrupted one-process run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "nodes" / "iter_0000002.pth", resumed)
    run_nodes([[sys.executable, "tools/train.py", str(config(resumed, 2)), "--resume", "--no-progress"]], env,
              tmp_path / "logs_resumed")
    final = torch.load(resumed / "final.pth", weights_only=True)
    assert final["world_size"] == 1 and final["samples_seen"] == 8
    loss_diff = max_loss_diff(read_log(resumed), one_log[2:])
    weight_diff = max_weight_diff(resumed / "final.pth", tmp_path / "single" / "final.pth")
    print(f"resumed vs uninterrupted: max loss difference {loss_diff:.2g}, max weight difference {weight_diff:.2g}")
    assert loss_diff <= 1e-5 and weight_diff <= 1e-6
