"""Local and cluster infrastructure: the local stack (Ray head, S3 endpoint, MLflow server) and
the slow-S3 proxy; cluster definitions live beside them (aws/, k8s/, mlflow/)."""
