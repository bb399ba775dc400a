#!/usr/bin/env bash
# CAMs you already made with IRN (or MCTformer, CLIP-ES) -> DHR seeds and pseudo-masks, scored.
#
#   CAM_DIR=irn/result/cam DATA=data/VOCdevkit/VOC2012 bash examples/import_irn_cams.sh
#   FORMAT=mctformer CAM_DIR=MCTformer_results/MCTformer_v2/voc/attn-patchrefine-npy DATA=... bash examples/import_irn_cams.sh
#
# CAM_DIR holds one <id>.npy per image of the split:
#   irn        {'keys': (K,) 0-based class ids, 'cam': (K, H/4, W/4), 'high_res': (K, H, W)}  (step/make_cam.py)
#   mctformer  {class id 0-based: (H, W) float32}                       (main.py --gen_attention_maps --cam-npy-dir)
#   clip-es    {'keys': (K,), 'attn_highres': (K, H, W) float16}
# The files are pickles; dhr reads them without running code from them.
#
# Step 3 of DHR also needs WSS *features*, which CAM files do not hold: give the checkpoint of the
# network that made the CAMs (WSS_WEIGHTS, e.g. IRN's res50_cam.pth; its CAMs are recomputed and
# ignored) or a features store you already have (WSS_FEATURES).
# USS features come from DHR's own .pt files (USS_PT_DIR, from its produce_uss_features.py) or are
# computed here with `dhr cams --uss $USS` (default lite0, which ships its ImageNet weights).
# Outputs in $OUT: cams.h5, [wss.h5], uss.h5, seeds.h5, masks.h5, eval.json.
set -euo pipefail

FORMAT=${FORMAT:-irn}                 # irn | mctformer | clip-es
CAM_DIR=${CAM_DIR:?folder of <id>.npy CAM files}
DATA=${DATA:-data/VOCdevkit/VOC2012}  # any layout dhr reads: VOC, flat or DHR/MARS
SPLIT=${SPLIT:-train}
OUT=${OUT:-imported_out}
DEVICE=${DEVICE:-auto}
CRF=${CRF:-1}                         # 0: no dense CRF in seed / propagate (faster on CPU)
case $FORMAT in irn) default_wss=resnet ;; mctformer) default_wss=mctformer ;; *) default_wss= ;; esac
WSS=${WSS:-$default_wss}              # the network behind WSS_WEIGHTS: resnet (IRN), mctformer, ...
WSS_WEIGHTS=${WSS_WEIGHTS:-}          # its checkpoint (IRN's sess/res50_cam.pth.pth, MCTformer's checkpoint.pth)
WSS_FEATURES=${WSS_FEATURES:-}        # or: a features store (or a cams store with features)
USS_PT_DIR=${USS_PT_DIR:-}            # DHR's <id>.pt USS features; empty: compute them with $USS
USS_SOURCE=${USS_SOURCE:-stego}       # what those .pt files are (stego or cause), recorded in the store
USS=${USS:-lite0}                     # otherwise: lite0, or stego / cause / dino_* with the weights below
USS_WEIGHTS=${USS_WEIGHTS:-}
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-}
DHR=${DHR:-dhr}

if [[ -z "$WSS_FEATURES" && ( -z "$WSS_WEIGHTS" || -z "$WSS" ) ]]; then
    echo "error: Step 3 needs WSS features: set WSS_WEIGHTS (and WSS) to the network that made the CAMs," \
         "or WSS_FEATURES to a features store" >&2
    exit 2
fi
mkdir -p "$OUT"
no_crf=$([[ $CRF == 0 ]] && echo --no-crf || true)
common=(--data "$DATA" --split "$SPLIT" --overwrite --quiet)

# 1. The peer's CAM files -> a cams store (0-based keys become VOC labels 1..20).
$DHR import "$FORMAT" "$CAM_DIR" "${common[@]}" --out "$OUT/cams.h5"

# 2. USS features: imported, or computed.
if [[ -n "$USS_PT_DIR" ]]; then
    $DHR import dhr-pt "$USS_PT_DIR" "${common[@]}" --source "$USS_SOURCE" --out "$OUT/uss.h5"
else
    $DHR cams --uss "$USS" ${USS_WEIGHTS:+--uss-weights "$USS_WEIGHTS"} \
        ${BACKBONE_WEIGHTS:+--backbone-weights "$BACKBONE_WEIGHTS"} "${common[@]}" --device "$DEVICE" --out "$OUT/uss.h5"
fi

# 3. WSS features for Step 3 (the network's CAMs in this store are not used).
if [[ -z "$WSS_FEATURES" ]]; then
    $DHR cams --wss "$WSS" --wss-weights "$WSS_WEIGHTS" "${common[@]}" --device "$DEVICE" --out "$OUT/wss.h5"
    WSS_FEATURES=$OUT/wss.h5
fi

# 4. Step 1: seeds from the imported CAMs. 5. Steps 2-3: dense masks.
$DHR seed --cams "$OUT/cams.h5" "${common[@]}" --device "$DEVICE" $no_crf --out "$OUT/seeds.h5"
$DHR propagate --seeds "$OUT/seeds.h5" --uss "$OUT/uss.h5" --wss "$WSS_FEATURES" --cams "$OUT/cams.h5" \
    "${common[@]}" --device "$DEVICE" $no_crf --out "$OUT/masks.h5"

# 6. Score on the split's ground truth (VOC train has it; drop this line for a split without).
$DHR eval --pred "$OUT/masks.h5" --data "$DATA" --split "$SPLIT" --json "$OUT/eval.json" --overwrite --quiet
echo "done: $OUT/masks.h5 (dhr export $OUT/masks.h5 --out DIR for PNGs)"
