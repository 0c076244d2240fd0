"""FedAvg-BBT and FedBPT on Flower: the client (local CMA-ES against the soft-prompt black box), the strategy
(the two aggregation rules), the server (strategy + central evaluation + results) and the message layout."""
