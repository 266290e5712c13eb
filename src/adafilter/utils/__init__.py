"""Small shared tools: the one atomic writer, downloader, seeding helper and ``set_submodule``;
the CPU training allocator setting."""
