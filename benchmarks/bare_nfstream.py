"""The reference: a bare NFStreamer loop over a capture, as a user of NFStream would write it."""

from __future__ import annotations

import argparse

from nfstream import NFStreamer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("capture")
    parser.add_argument("--splt", type=int, default=0, help="splt_analysis, to match iotscan's main pass")
    args = parser.parse_args()
    flows = 0
    for _ in NFStreamer(source=args.capture, statistical_analysis=True, splt_analysis=args.splt):
        flows += 1
    print(flows)


if __name__ == "__main__":
    main()
