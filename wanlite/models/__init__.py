"""The Wan2.2 networks: one DiT class, the umT5 encoder and both VAEs."""
