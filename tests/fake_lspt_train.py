"""A stand-in for `lspt-train` in the sweep's fast tests (LSPT_SWEEP_TRAINER="python tests/fake_lspt_train.py").

It takes lspt-train's options (the ones it does not use are ignored), refuses an --output that already holds a
run without --resume (and --resume without resume.pt) as lspt-train does, and writes what lspt-train writes:
config.json, resume.pt (JSON here: {"epoch": n}) before the first epoch and after each one, log.jsonl with one
row per epoch, last/best.safetensors, curves.png. Accuracies are a fixed function of (task folder, method,
lr, weight decay, seed, scored split, epoch), so two sweeps with the same plan give the same report. It imports
no torch: a run costs a few milliseconds.

Environment knobs (a substring of --output selects the runs):
    FAKE_EPOCH_S=0.2          sleep per epoch
    FAKE_SLOW=substr          a matching run sleeps 2 s per epoch (a run still training when the test looks)
    FAKE_FAIL_ONCE=substr     the first attempt of a matching run exits 1 after printing some lines
    FAKE_FAIL_ALWAYS=substr   every attempt of a matching run exits 1
    FAKE_DIVERGE=substr       a matching run stops at epoch 1 with lspt-train's non-finite-loss error (exit 2)
Every invocation appends {"pid", "resume", "start_epoch", "end_epoch", "rc"} to OUT/fake_invocations.jsonl.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def accuracy(args, epoch: int) -> float:
    key = f"{Path(args.data).name}|{args.method}|{args.cspc}|{args.lr!r}|{args.weight_decay!r}|{args.seed}|" \
          f"{args.val_split}"
    base = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    # Rises with the epochs, with a dip at the last one so the best epoch is not the last.
    final = round(20 + 75 * base, 2)
    return final if epoch == args.epochs else round(min(100.0, final + (2.5 if epoch == args.epochs - 1 else -5.0)), 2)


def main() -> int:
    p = argparse.ArgumentParser()
    for opt in ("--data", "--layout", "--train-split", "--val-split", "--method", "--output", "--model", "--cspc"):
        p.add_argument(opt, default=None)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    args, _ = p.parse_known_args()
    out = Path(args.output)
    state = out / "resume.pt"
    record = dict(pid=os.getpid(), resume=args.resume, start_epoch=None, end_epoch=None, rc=None)

    def finish(rc: int) -> int:
        record["rc"] = rc
        with open(out / "fake_invocations.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return rc

    out.mkdir(parents=True, exist_ok=True)
    if args.resume and not state.is_file():
        print(f"lspt-train: error: --resume: {out} holds no resume state (resume.pt)", file=sys.stderr)
        return finish(2)
    if not args.resume and (out / "config.json").exists():
        print(f"lspt-train: error: --output {out} already holds a run", file=sys.stderr)
        return finish(2)
    for knob, once in (("FAKE_FAIL_ONCE", True), ("FAKE_FAIL_ALWAYS", False)):
        pattern = os.environ.get(knob)
        if pattern and pattern in str(out) and not (once and (out / "fake_failed_once").exists()):
            (out / "fake_failed_once").touch()
            print("loading data ...\nTraceback (most recent call last):\nRuntimeError: fake crash for the test")
            return finish(1)
    if not args.resume:
        (out / "config.json").write_text(json.dumps(vars(args)))
        state.write_text(json.dumps({"epoch": 0}))
    start = json.loads(state.read_text())["epoch"]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if start else []
    record["start_epoch"] = start
    pattern = os.environ.get("FAKE_DIVERGE")
    slow = os.environ.get("FAKE_SLOW")
    epoch_s = 2.0 if slow and slow in str(out) else float(os.environ.get("FAKE_EPOCH_S", "0"))
    try:
        for epoch in range(start + 1, args.epochs + 1):
            time.sleep(epoch_s)
            if pattern and pattern in str(out):
                print(f"lspt-train: error: the training loss is nan at epoch {epoch} step 1: lower --lr (the last "
                      f"good state is in {out})", file=sys.stderr)
                return finish(2)
            rows.append(dict(epoch=epoch, train_loss=1.0 / epoch, train_acc=50.0, val_acc=accuracy(args, epoch),
                             lr=args.lr, images_per_s=100.0 + epoch, peak_memory_gb=0.1, epoch_time_s=0.01))
            (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            for name in ("last.safetensors", "best.safetensors", "curves.png"):
                (out / name).write_bytes(b"fake")
            state.write_text(json.dumps({"epoch": epoch}))
            record["end_epoch"] = epoch
    except KeyboardInterrupt:
        print(f"lspt-train: interrupted; resume.pt holds epoch {json.loads(state.read_text())['epoch']}",
              file=sys.stderr)
        return finish(130)
    print(f"best val accuracy: {max(r['val_acc'] for r in rows):.2f}%")
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
