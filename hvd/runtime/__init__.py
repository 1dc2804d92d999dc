"""Where and how the product's processes run: project paths, Ray (local or a cluster), worker setup, the
reaper of orphaned children, durable publishing, stopping on signals, the library's logs and its progress lines."""
