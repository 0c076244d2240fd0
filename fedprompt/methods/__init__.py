"""One folder per method; pure algorithm code that runs without Flower."""
