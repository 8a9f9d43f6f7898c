"""Console entry points; each is `main(argv) -> int` over the library API."""
