"""`interp report DIR`: one self-contained HTML page (no network) for the saved Results of a command's --out."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="write DIR/report.html: interactive heatmaps, images, settings, command")
    p.add_argument("folder", help="an interp command's --out folder (Results saved as .json + .safetensors)")
    p.add_argument("--html", default=None, help="where to write the page (default: FOLDER/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from interp.report import report_dir

    print(f"wrote {report_dir(args.folder, args.html)}")
    return 0
