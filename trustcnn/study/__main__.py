"""``python -m trustcnn.study build | serve | analyze``: see :mod:`trustcnn.study`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trustcnn.study",
        description="The paper's user experiment: build a study from trained runs, serve it to participants, "
                    "analyze their votes into the case table (Table 3).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,serve,analyze}")

    b = sub.add_parser("build", help="sample test images, render each model's map, write a study directory",
                       description="Sample test images (seeded), render each model's map on one colour scale and "
                                   "write a study directory: images/ and manifest.json (the hidden model of each "
                                   "panel; panel order random per question).")
    b.add_argument("--baseline", required=True, metavar="RUN", help="the baseline run directory or .ckpt (e.g. loss=ce)")
    b.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="the other models' runs")
    b.add_argument("--out", required=True, metavar="DIR", help="the study directory to write (new or empty)")
    b.add_argument("--names", nargs="+", metavar="NAME", help="model names, baseline first (never shown to participants)")
    b.add_argument("--questions", type=int, default=50, metavar="N", help="test images to ask about (default 50)")
    b.add_argument("--seed", type=int, default=0, help="seeds the images drawn and the panel orders (default 0)")
    b.add_argument("--title", default="Which map highlights the object?", help="the heading participants see")
    b.add_argument("--image-size", type=int, default=256, metavar="PX", help="longer side of every picture (default 256)")
    b.add_argument("--data-root", metavar="DIR", help="override data.root of every run")
    b.add_argument("--device", help="cpu | cuda | cuda:1 ... (default: cuda when available)")
    b.add_argument("--saliency", choices=["gradcam", "guided_gradcam"],
                   help="explain every model with this method (default: each run's own)")

    s = sub.add_parser("serve", help="ask the questions in a local web app",
                       description="Serve the study to participants' browsers; answers go to <study dir>/answers.sqlite.")
    s.add_argument("study", metavar="STUDY_DIR")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    s.add_argument("--db", metavar="FILE", help="answers database (default <study dir>/answers.sqlite)")
    s.add_argument("--threads", type=int, default=4, help="request threads (default 4)")

    a = sub.add_parser("analyze", help="the case table and more from the votes",
                       description="The paper's Table 3 from the votes (95%% CIs), agreement between participants, "
                                   "a breakdown by background and, with masks, the chosen map vs the energy "
                                   "pointing game. Writes analysis.md, analysis.json, analysis.png, answers.csv.")
    a.add_argument("study", metavar="STUDY_DIR")
    a.add_argument("--db", metavar="FILE", help="answers database (default <study dir>/answers.sqlite)")
    a.add_argument("--out", metavar="DIR", help="output directory (default <study dir>/analysis)")
    a.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the agreement CI (default 1000)")
    a.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            from trustcnn.study.build import build_study, build_summary

            study = build_study(args.runs, args.baseline, args.out, names=args.names, questions=args.questions,
                                seed=args.seed, title=args.title, image_size=args.image_size,
                                data_root=args.data_root, device=args.device, saliency=args.saliency)
            print(build_summary(study, args.out))
        elif args.command == "serve":
            from trustcnn.study.app import serve

            serve(args.study, host=args.host, port=args.port, db_path=args.db, threads=args.threads,
                  announce=lambda line: print(line, flush=True))
        else:
            from pathlib import Path

            from trustcnn.study.analyze import analyze_study, format_markdown

            out = args.out or Path(args.study) / "analysis"
            result = analyze_study(args.study, db_path=args.db, out_dir=out, bootstrap=args.bootstrap, seed=args.seed)
            print(format_markdown(result))
            print(f"\nWritten to {result['out_dir']}: analysis.md, analysis.json, analysis.png, answers.csv",
                  file=sys.stderr)
    except (OSError, ValueError) as err:  # a missing file, a bad value, a port in use
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
    main()
