"""Cross-syntax pixel differences: one image in every transfer syntax, preprocessed, vs its native copy.

Synthetic radiographs (tests/syntax_writers.py: an anatomical phantom with quantum noise, collimator
shutters and a burnt-in marker) written with real encoders in every syntax this environment encodes,
and DICOM WG04's reference radiographs as their makers stored them. Each file goes through
xrayops.dicom.pixels.preprocess; the table is the max and mean absolute difference, in 1/255, of each
syntax's shard against the explicit VR little endian (or first lossless) copy. Writes
benchmarks/results/pixel_invariance.json. Usage:
  .venv/bin/python benchmarks/bench_pixel_invariance.py [--label after]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the encoders and the phantom radiograph the tests use

# name -> (rows, cols, bits, photometric, output size, window or None)
SYNTHETIC = {
    "1500x1200 12-bit MONOCHROME2, percentile window, 256 px": (1500, 1200, 12, "MONOCHROME2", 256, None),
    "1501x1203 12-bit MONOCHROME1, file window, 128 px": (1501, 1203, 12, "MONOCHROME1", 128, (2048, 3600)),
    "2500x2048 16-bit MONOCHROME2, percentile window, 256 px": (2500, 2048, 16, "MONOCHROME2", 256, None),
}
WG04 = {
    "WG04 RG2 (2140x1760, 10-bit), 256 px": ["wg04__RG2_UNC", "wg04__RG2_RLE", "wg04__RG2_J2KR", "pylibjpeg-data__RG2_JLSL",
                                             "pylibjpeg-data__RG2_JPLL", "wg04__RG2_J2KI", "pylibjpeg-data__RG2_JLSN"],
    "WG04 RG3 (1760x1760, 10-bit, MONOCHROME1), 256 px": ["wg04__RG3_RLE", "pydicom-data-git__RG3_J2KR", "wg04__RG3_JLSL",
                                                          "wg04__RG3_JPLL", "pydicom-data-git__RG3_J2KI", "wg04__RG3_JLSN"],
    "WG04 XA1 (1024x1024, 10-bit), 256 px": ["wg04__XA1_UNC", "wg04__XA1_RLE", "wg04__XA1_J2KR", "wg04__XA1_JLSL",
                                             "wg04__XA1_JPLL", "wg04__XA1_J2KI", "wg04__XA1_JLSN"],
}  # fmt: skip
LOSSY_WG04 = ("J2KI", "JLSN")


def differences(shards: dict[str, np.ndarray], lossless: list[str]) -> dict:
    reference = shards[lossless[0]].astype(int)
    rows = {
        name: {"max": int(np.abs(s.astype(int) - reference).max()), "mean": round(float(np.abs(s.astype(int) - reference).mean()), 3),
               "lossless": name in lossless}
        for name, s in shards.items()
    }  # fmt: skip
    pairs = [np.abs(shards[a].astype(int) - shards[b].astype(int)) for i, a in enumerate(lossless) for b in lossless[i + 1 :]]
    return {
        "reference": lossless[0],
        "lossless_pairs_max": int(max(p.max() for p in pairs)),
        "lossless_pairs_mean_worst": round(float(max(p.mean() for p in pairs)), 3),
        "vs_reference": rows,
    }


def synthetic(folder: Path) -> dict:
    from dicom_factory import make_dataset
    from syntax_writers import LOSSLESS, LOSSY, radiograph

    from xrayops.contracts import PreprocessingSpec
    from xrayops.dicom.decode import read_dicom
    from xrayops.dicom.pixels import preprocess

    out = {}
    for case, (rows, cols, bits, photometric, size, window) in SYNTHETIC.items():
        pixels = radiograph(rows, cols, bits)
        if photometric == "MONOCHROME1":
            pixels = (2**bits - 1 - pixels).astype(np.uint16)
        tags = {"WindowCenter": window[0], "WindowWidth": window[1]} if window else {}
        ds = make_dataset(pixels, photometric=photometric, bits_stored=bits, **tags)
        shards = {}
        for name, write in [*LOSSLESS.items(), *((n, w) for n, (w, _) in LOSSY.items())]:
            path = folder / f"{rows}x{cols}-{name}.dcm"
            write(ds, path)
            shards[name] = preprocess(read_dicom(path), PreprocessingSpec(size=size))
        out[case] = differences(shards, list(LOSSLESS))
        print(case, out[case]["lossless_pairs_max"], out[case]["lossless_pairs_mean_worst"], file=sys.stderr, flush=True)
    return out


def wg04(samples: Path) -> dict:
    from xrayops.contracts import PreprocessingSpec
    from xrayops.dicom.decode import read_dicom
    from xrayops.dicom.pixels import preprocess

    out = {}
    for case, names in WG04.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shards = {n: preprocess(read_dicom(samples / f"{n}.dcm"), PreprocessingSpec(size=256)) for n in names}
        out[case] = differences(shards, [n for n in names if not n.endswith(LOSSY_WG04)])
        print(case, out[case]["lossless_pairs_max"], out[case]["lossless_pairs_mean_worst"], file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="key of this run in the results file (before/after)")
    parser.add_argument("--samples", type=Path, default=None, help="WG04 radiographs folder (default: the tests' samples)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pixel_invariance.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = synthetic(Path(tmp))
    if args.samples is None:
        from conftest import DICOM_SAMPLES  # where the tests find the real samples

        args.samples = DICOM_SAMPLES / "radiographs"
    if args.samples.is_dir():
        result.update(wg04(args.samples))
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
