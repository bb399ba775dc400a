#!/usr/bin/env bash
# PASCAL VOC 2012 with checkpoints you already have on disk: an IRN-style ResNet-50 CAM network
# (WSS) and a STEGO head on DINO, or a plain DINO backbone (USS). dhr never downloads anything.
#
#   VOC=data/VOCdevkit/VOC2012 WSS_WEIGHTS=res50_cam.pth \
#   USS_WEIGHTS=STEGO_VOC2012.pt BACKBONE_WEIGHTS=dino_vitbase8_pretrain.pth \
#   bash examples/voc_with_your_checkpoints.sh
#
# Every variable below can be set from the environment. Outputs, in $OUT:
#   cams.h5 (WSS CAMs + features), uss.h5 (USS features), seeds.h5, masks.h5,
#   eval.json (mIoU, mFPR, mFNR on the split's ground truth), png/<id>.png (VOC palette, 255 kept).
set -euo pipefail

VOC=${VOC:-data/VOCdevkit/VOC2012}    # VOC2012 folder (or VOCdevkit/ above it)
SPLIT=${SPLIT:-train}                 # ImageSets/Segmentation/<SPLIT>.txt; train = the 1,464 with GT
OUT=${OUT:-voc_out}
DEVICE=${DEVICE:-auto}                # cpu, cuda, cuda:N or auto
CRF=${CRF:-1}                         # 0: no dense CRF in seed / propagate (faster on CPU)

WSS=${WSS:-resnet}                    # resnet (depth read from the file), resnet50, resnet101, mctformer
WSS_WEIGHTS=${WSS_WEIGHTS:-res50_cam.pth}     # torchvision keys + classifier.weight, or IRN's sess/res50_cam.pth.pth
USS=${USS:-stego}                     # stego, cause, dino_vits8, dino_vitb8, dinov2_vitb14, ...
USS_WEIGHTS=${USS_WEIGHTS:-STEGO_VOC2012.pt}  # STEGO .ckpt / DHR's packed STEGO_VOC2012.pt, or the DINO file itself
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-}        # DINO backbone under a packed STEGO / CAUSE head; empty for dino_*

SIDE=${SIDE:-}                        # empty: each network's own input size
SCALES=${SCALES:-}                    # empty: 1.0,0.5,1.5,2.0 (CAMs, as IRN) / 2.0,1.0,1.5,0.5 (USS, as DHR)
DHR=${DHR:-dhr}                       # e.g. DHR=".venv/bin/dhr" or DHR="python -m dhr_cli"

mkdir -p "$OUT"
no_crf=$([[ $CRF == 0 ]] && echo --no-crf || true)
common=(--data "$VOC" --split "$SPLIT" --device "$DEVICE" --overwrite --quiet)

# 1. WSS: CAMs of the labelled classes (and the network's features, used by Step 3).
$DHR cams "${common[@]}" ${SIDE:+--side "$SIDE"} ${SCALES:+--scales "$SCALES"} \
    --wss "$WSS" --wss-weights "$WSS_WEIGHTS" --out "$OUT/cams.h5"

# 2. USS: dense features. A packed head needs the backbone it was trained on.
$DHR cams "${common[@]}" ${SIDE:+--side "$SIDE"} ${SCALES:+--scales "$SCALES"} \
    --uss "$USS" --uss-weights "$USS_WEIGHTS" ${BACKBONE_WEIGHTS:+--backbone-weights "$BACKBONE_WEIGHTS"} --out "$OUT/uss.h5"

# 3. Step 1: seeds from the CAMs (OT rebalancing, CRF), 255 = unsure.
$DHR seed --cams "$OUT/cams.h5" "${common[@]}" $no_crf --out "$OUT/seeds.h5"

# 4. Steps 2-3: dense masks from the seeds, USS prototypes, WSS features for look-alike classes.
$DHR propagate --seeds "$OUT/seeds.h5" --uss "$OUT/uss.h5" --wss "$OUT/cams.h5" --cams "$OUT/cams.h5" \
    "${common[@]}" $no_crf --out "$OUT/masks.h5"

# 5. Score against the split's ground truth, 6. write palette PNGs for a trainer.
$DHR eval --pred "$OUT/masks.h5" --data "$VOC" --split "$SPLIT" --json "$OUT/eval.json" --overwrite --quiet
$DHR export "$OUT/masks.h5" --out "$OUT/png" --overwrite --quiet
echo "done: $OUT/masks.h5, $OUT/eval.json, $OUT/png/"
