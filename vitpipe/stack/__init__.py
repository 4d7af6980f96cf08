"""Local servers for laptops and integration tests: SeaweedFS S3, MLflow, Prefect."""
