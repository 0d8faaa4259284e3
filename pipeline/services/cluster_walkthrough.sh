# The README's "ray job submit" walkthrough, verbatim (tests/test_local_cluster.py runs this file as it is).
# From the repository root, after `make cluster-up`; on a lab cluster only the first line differs (export the
# cluster's RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI/USERNAME/PASSWORD
# and GENESIS_SHARED_ROOT, a folder every node mounts).
eval "$(.venv/bin/python -m pipeline.services env)"
S=$GENESIS_SHARED_ROOT
SUBMIT=".venv/bin/ray job submit --runtime-env runtime_env.yaml --"
.venv/bin/genesis sample-data $S/data/luna16 --dataset luna16 --scans 4 --no-real
$SUBMIT python jobs/convert.py $S/data/luna16 --store $S/volume_store
$SUBMIT genesis patches pretrain --store $S/volume_store --out $S/patch_stores
$SUBMIT genesis patches task ncc --store $S/volume_store --out $S/patch_stores
$SUBMIT python jobs/pretrain.py --patches "$(ls -d $S/patch_stores/pretrain-*)" --preset tiny --epochs 2 --workers 2 --tracking-uri $MLFLOW_TRACKING_URI --storage-path $S/ray_results --name pretrain-on-cluster
$SUBMIT python jobs/transfer.py --patches $S/patch_stores --tasks ncc --inits scratch,models:/genesis-pretrained@best --seeds 0 --label-fractions 1 --preset tiny --epochs 1 --tracking-uri $MLFLOW_TRACKING_URI --storage-path $S/ray_results --results $S/transfer_results --name transfer-on-cluster
cat $S/transfer_results/results.md
