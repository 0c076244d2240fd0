"""FedDTPT on Flower: the client (search against the black box), the strategy (aggregation), the server
(strategy + central evaluation + results) and the message layout."""
