"""Where the application keeps things: storage (a folder or s3://), tracking (the one MLflow module) and
run records (the JSON that ties a storage folder to its MLflow run)."""
