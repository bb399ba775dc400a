#!/usr/bin/env bash
# Feed dhr's pseudo-masks to another segmentation trainer (mmsegmentation, a DeepLab repo, ...).
#
#   DATA=data/VOCdevkit/VOC2012 MASKS=voc_out/masks.h5 OUT=pseudo_voc bash examples/masks_for_another_trainer.sh
#
# Most trainers read a VOC-style root: images, one PNG per image whose pixel values are the class
# indices (255 = ignore), and a list of ids. This makes one in $OUT from a masks store:
#   $OUT/SegmentationClassAug/<id>.png   VOC palette PNGs, values = label values, 255 kept
#   $OUT/train_aug.txt                   the ids, one a line
#   $OUT/JPEGImages -> the dataset's image folder (a symlink), so $OUT works as a data_root
#   $OUT/pseudo_mask_scores.json         the masks scored on the dataset's ground truth, where it has some
set -euo pipefail

DATA=${DATA:?dataset folder (VOC, flat or DHR layout)}
MASKS=${MASKS:?masks store from dhr propagate (or dhr predict)}
OUT=${OUT:-pseudo_voc}
SPLIT=${SPLIT:-}                      # the split the masks were made for (for the scores); empty: the default
OVERWRITE=${OVERWRITE:-0}             # 1: write into an existing SegmentationClassAug (same-name files replaced)
DHR=${DHR:-dhr}

mkdir -p "$OUT"
masks_dir=$OUT/SegmentationClassAug

# 1. Palette PNGs, <id>.png. dhr export refuses a non-empty folder unless --overwrite.
$DHR export "$MASKS" --out "$masks_dir" --quiet $([[ $OVERWRITE == 1 ]] && echo --overwrite || true)

# 2. The id list trainers take as their split file.
(cd "$masks_dir" && ls -- *.png | sed 's/\.png$//' | sort) > "$OUT/train_aug.txt"

# 3. The images next to the masks (JPEGImages for VOC, images/ for flat, <split>/image for DHR).
for images in "$DATA/JPEGImages" "$DATA/VOC2012/JPEGImages" "$DATA/VOCdevkit/VOC2012/JPEGImages" \
              "$DATA/images" "$DATA/${SPLIT:-train}/image"; do
    if [[ -d $images ]]; then
        [[ -e $OUT/JPEGImages ]] || ln -s "$(cd "$images" && pwd)" "$OUT/JPEGImages"
        break
    fi
done

# 4. Check before spending GPU hours: score the PNGs against whatever ground truth the split has.
info=$($DHR info "$DATA" ${SPLIT:+--split "$SPLIT"} --json)
if [[ $info == *'"has_gt": true'* ]]; then
    $DHR eval --pred "$masks_dir" --data "$DATA" ${SPLIT:+--split "$SPLIT"} \
        --json "$OUT/pseudo_mask_scores.json" --overwrite --quiet > /dev/null
    echo "scores: $OUT/pseudo_mask_scores.json"
fi
echo "masks: $masks_dir ($(wc -l < "$OUT/train_aug.txt") images), list: $OUT/train_aug.txt"
# mmsegmentation 1.x: data_root='$OUT', data_prefix=dict(img_path='JPEGImages',
#   seg_map_path='SegmentationClassAug'), ann_file='train_aug.txt' (PascalVOCDataset, 21 classes).
# Plain PyTorch: examples/pseudo_mask_dataset.py.
