"""A plain Flower 1.41 app (Message API, Flower's FedAvg) on sklearn's digits: the baseline of
benchmarks/sim_overhead.py. Same job as `fl-dp simulate`'s quick start: 10 IID clients, the same MLP,
5 local epochs of SGD (lr 0.1, momentum 0.9, batch 16), federated and central evaluation every round."""
