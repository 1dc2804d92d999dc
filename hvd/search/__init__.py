"""Searching a gallery: the index job that encodes a benchmark split once and keeps it in MLflow
(`index_job`), and captions ranked against a kept gallery (`query`). The gallery format is `hvd.gallery`."""
