#!/usr/bin/env bash
# Trains the shipped weights on ../shared/data (exact commands recorded in weights_manifest.json).
# Usage: bash tools/train_release.sh OUT_DIR [MODEL ...]
set -euo pipefail
OUT=${1:?usage: train_release.sh OUT_DIR [MODEL ...]}; shift
D=${DATA:-../shared/data}
BODY="--data_dir $D/body_train.npz --val_dir $D/body_val.npz"
HANDS="--data_dir $D/hands_train.npz --val_dir $D/hands_val.npz"
models=${*:-gaussian gaussian_full hands joint_flow global_flow hand_vae hand_vae_so3}
for m in $models; do
  case $m in
    gaussian) posepriors-train gaussian --joints body+left_hand+right_hand $BODY $HANDS --max_epochs 3 --logger none --out "$OUT/gaussian" ;;
    # The shipped joint_flow and global_flow are the trained flows mixed with a broad component (w = 0.1), fitted in
    # closed form on the same training data: it keeps the density finite on poses from other pipelines (docs/models.md).
    joint_flow) posepriors-train joint_flow --hidden 64 $BODY $HANDS --max_epochs 10 --batch_size 512 --logger none --out "$OUT/joint_flow_trained"
        python tools/attach.py "$OUT/joint_flow_trained" "$OUT/joint_flow" --data_dir $D/body_train.npz --data_dir $D/hands_train.npz --broad_weight 0.1 ;;
    # 8 epochs, not 14: a 14-epoch run reached a lower body NLL (-98.5 vs -94.4 nats) but its sharper density
    # made MAP denoising worse than the Gaussian's (docs/models.md). The smoothed body density (4 flows trained on
    # poses with 0.1 rad noise) gives denoise() its posterior mean by Tweedie's formula at noise_std 0.1. The fitting
    # energy (2 of those flows times a full-covariance body Gaussian, weight 0.5) is what fit_keypoints minimises.
    global_flow) posepriors-train global_flow --joints body+left_hand+right_hand --parts body left_hand+right_hand \
        --coupling spline --bins 4 --hidden 128 --conditional $BODY $HANDS --max_epochs 8 --batch_size 512 --logger none --out "$OUT/global_flow_trained"
        python tools/attach.py "$OUT/global_flow_trained" "$OUT/global_flow_broad" --data_dir $D/body_train.npz --data_dir $D/hands_train.npz --broad_weight 0.1
        python tools/attach.py "$OUT/global_flow_broad" "$OUT/global_flow_smoothed" --data_dir $D/body_train.npz --data_dir $D/hands_train.npz \
            --smoothed_noise_std 0.1 --smoothed_members 4 --smoothed_epochs 60
        python tools/attach.py "$OUT/global_flow_smoothed" "$OUT/global_flow" --data_dir $D/body_train.npz --data_dir $D/hands_train.npz \
            --energy_gaussian_weight 0.5 --energy_members 2 ;;
    gaussian_full) posepriors-train gmm --joints body+left_hand+right_hand --num_components 1 $BODY $HANDS --logger none --out "$OUT/gaussian_full" ;;
    # The recommended hand prior: the full-covariance Gaussian over both hands (gaussian_full's hand block, on its own).
    hands) posepriors-train gmm --joints left_hand+right_hand --num_components 1 $HANDS --logger none --out "$OUT/hands_trained"
        python tools/attach.py "$OUT/hands_trained" "$OUT/hands" --data_dir $D/hands_train.npz --broad_weight 0.1 ;;
    hand_vae) posepriors-train hand_vae --model_type standard $HANDS --max_epochs 8 --batch_size 1024 --learning_rate 1e-3 --logger none --out "$OUT/hand_vae" ;;
    hand_vae_so3) posepriors-train hand_vae --model_type so3 $HANDS --max_epochs 8 --batch_size 1024 --learning_rate 1e-3 --logger none --out "$OUT/hand_vae_so3" ;;
    # Hand-only flows: not bundled (size budget), trained to measure which hand prior to pick (docs/models.md).
    hand_joint_flow) posepriors-train joint_flow --joints left_hand+right_hand --hidden 64 $HANDS --max_epochs 10 --batch_size 512 --logger none --out "$OUT/hand_joint_flow" ;;
    hand_global_flow) posepriors-train global_flow --joints left_hand+right_hand --coupling spline --bins 4 --hidden 128 \
        $HANDS --max_epochs 14 --batch_size 512 --logger none --out "$OUT/hand_global_flow" ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
  esac
done
