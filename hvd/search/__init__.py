"""Searching a gallery: the index job that encodes a benchmark split once and keeps it in MLflow
(`index_job`), captions ranked against a kept gallery (`query`, `retriever`), and that search served over
HTTP by Ray Serve (`service`). The gallery format is `hvd.gallery`."""
