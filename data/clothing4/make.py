#!/usr/bin/env python3
"""Make data/clothing4: the demo's real photos, a CC0 subset of the clothing-small dataset.

The seed protocol (AutoMM's focal-loss tutorial rebuilt on clothing-small): four classes downsampled to
200 / 66 / 22 / 7 training images (pants, t-shirt, shoes, dress) and their validation split (49 / 81 / 26 /
32). Each photo is resized so its shorter side is 256 px (Lanczos) and stored as JPEG quality 85; the
tables name classes by their folder (`image,label`, paths relative to this folder).

  pip install pillow
  python3 data/clothing4/make.py --source ../shared/data/clothing-small
"""
import argparse
import csv
import os
import shutil

from PIL import Image

SHORT_SIDE = 256
QUALITY = 85


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="clothing-small (with imbalanced4_{train,validation}.csv)")
    ap.add_argument("--output", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    for split in ["train", "validation"]:
        rows = []
        with open(os.path.join(args.source, f"imbalanced4_{split}.csv"), newline="") as f:
            for r in csv.DictReader(f):
                rel = r["image"]
                label = rel.split("/")[1]
                im = Image.open(os.path.join(args.source, rel)).convert("RGB")
                w, h = im.size
                s = SHORT_SIDE / min(w, h)
                im = im.resize((round(w * s), round(h * s)), Image.LANCZOS)
                out = os.path.join(args.output, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                im.save(out + ".tmp", "JPEG", quality=QUALITY)
                os.replace(out + ".tmp", out)
                rows.append((rel, label))
        table = os.path.join(args.output, f"{split}.csv")
        with open(table + ".tmp", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", "label"])
            w.writerows(rows)
        os.replace(table + ".tmp", table)
        print(f"{split}: {len(rows)} photos")
    shutil.copyfile(os.path.join(args.source, "LICENSE"), os.path.join(args.output, "LICENSE"))


if __name__ == "__main__":
    main()
