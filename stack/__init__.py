"""The launcher: brings up the product on one machine with its embedded defaults."""
