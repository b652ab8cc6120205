"""`interp check MODEL`: verify interp's site identities and grid shortcuts on a model (exit 1 on a failure)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check", help="verify site identities, patch parity and grid shortcuts on a model")
    p.add_argument("model", help="zoo name (e.g. smollm2), local folder or hub name")
    p.add_argument("--seq-len", type=int, default=None,
                   help="prompt length in tokens (default: longer than every sliding window of the model)")
    p.add_argument("--batches", default="1,3", help="batch sizes to check, comma-separated (default 1,3)")
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed relative difference (default 1e-5)")
    p.add_argument("--no-grids", action="store_true", help="skip the run_grid shortcut comparisons")
    p.add_argument("--out", default=None, help="also save the table as an interp.Result in this folder")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    import interp
    from interp.check import CheckError, check
    from recipes.models import load

    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise CheckError(f"--batches takes comma-separated integers such as 1,3, not {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise CheckError(f"--batches needs batch sizes >= 1, got {args.batches!r}")
    lm = interp.attach(load(args.model))
    report = check(lm, seq_len=args.seq_len, batches=batches, tol=args.tol, grids=not args.no_grids)
    print(report.table())
    if args.out:
        print(f"saved {report.to_result().save(os.path.join(args.out, 'check'))}")
    return 0 if report.ok else 1
