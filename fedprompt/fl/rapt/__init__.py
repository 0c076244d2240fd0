"""RAPT on Flower: clients privatize their examples locally and send only privatized token ids; the server
(the service) trains the soft prompt and the reconstruction head on what it received, and evaluates."""
