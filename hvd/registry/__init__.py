"""MLflow as the product's record: runs and their lifecycle (`runs`), registered models and the champion
(`models`), the safe model flavor (`flavor`), loading a model from any URI (`sources`) and the gallery
indexes linked to a model version (`index_links`)."""
