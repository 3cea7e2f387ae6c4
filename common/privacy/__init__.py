"""Differential-privacy building blocks shared by the server and the clients."""
