"""train.py with one SIGKILL planted in it: the launcher of the chaos tests (tests/test_chaos.py).

    CHAOS_KILLS="validation 2;1:step 3" CHAOS_LOG=kills.txt python tests/kill_at.py --config ... --resume auto

CHAOS_KILLS holds one moment per start of the job, separated by ";". A start takes the moment at
its own index, torchrun's TORCHELASTIC_RESTART_COUNT (0 for a plain process), and runs train.py
until it: "KIND N" kills the process at the N-th event of that kind it meets, "R:KIND N" does so on
rank R only. The kinds: step (entering an optimizer step), validation (entering an evaluation),
checkpoint (half-way through writing a checkpoint file), logged (just after a row of metrics.jsonl
is written). Just before it dies the process appends "KIND N" to CHAOS_LOG.
"""

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import runlog  # noqa: E402
import train  # noqa: E402


def plant(kind: str, n: int) -> None:
    seen = [0]

    def due() -> bool:
        seen[0] += 1
        return seen[0] == n

    def die():
        with open(os.environ["CHAOS_LOG"], "a") as log:
            log.write(f"{kind} {n}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("step", "validation"):
        name = "train_step" if kind == "step" else "evaluate"
        original = getattr(train, name)

        def entering(*args, **kwargs):
            if due():
                die()
            return original(*args, **kwargs)
        setattr(train, name, entering)
    elif kind == "logged":
        scalars = runlog.RunLog.scalars

        def logged(self, *args, **kwargs):
            scalars(self, *args, **kwargs)
            if due():
                die()
        runlog.RunLog.scalars = logged
    elif kind == "checkpoint":
        save = torch.save

        def half_written(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "optimizer" in obj and due():
                whole = io.BytesIO()
                save(obj, whole, *args, **kwargs)
                f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
                f.flush()
                die()
            return save(obj, f, *args, **kwargs)
        torch.save = half_written
    else:
        raise SystemExit(f"CHAOS_KILLS: unknown kind {kind!r}")


if __name__ == "__main__":
    moments = [m for m in os.environ.get("CHAOS_KILLS", "").split(";") if m]
    start = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if start < len(moments):
        rank, _, moment = moments[start].rpartition(":")
        if not rank or int(rank) == int(os.environ.get("RANK", 0)):
            kind, n = moment.split()
            plant(kind, int(n))
    sys.exit(train.main(sys.argv[1:]))
