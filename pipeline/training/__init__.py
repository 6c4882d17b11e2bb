"""The one training engine: a shared adversarial step, a loop counted in images shown,
exact-resume checkpoints. The engine (step, loop, checkpoint, batches, ...) is plain PyTorch: no
Ray, no MLflow. Ray Train wraps it from the edge:

    ray_train.py     launch_training and the worker loop: the one place that launches Ray Train
    ray_reporter.py  the engine's Reporter on a worker: reports to Ray Train, forwards to MLflow
    ray_progress.py  rank 0's live progress and the driver's display of it
    ray_cluster.py   starting or joining Ray for a run, its resource check, the ranks' nodes
    run_folders.py   run folders in the storage path and the run name (fresh or --resume)
    failures.py      a failed run told to the user
    delivery.py      the final checkpoint copied to models/<family>/, with loss_curves.tsv
"""
