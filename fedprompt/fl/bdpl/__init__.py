"""BDPL / FedOne on Flower: the client (local BDPL steps against the black box from the global logits),
the strategy (K clients sampled per round, seeded; FedAvg of their logits weighted by examples; K = 1 is
FedOne), the server (strategy + central evaluation of the argmax prompt + results) and the records."""
