"""POST on Flower: the client (local soft-prompt tuning, optionally DP-SGD with a persistent accountant),
the server (FedAvg of the prompts weighted by examples, central evaluation every round) and the records."""
