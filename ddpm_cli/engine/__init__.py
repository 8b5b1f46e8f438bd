"""The engine: where a config becomes objects, and where training, sampling, export and evaluation happen.

It never prints and never exits: it raises DdpmError subclasses and reports progress through callbacks."""
