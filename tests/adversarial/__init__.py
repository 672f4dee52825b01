"""The customer who wants to pay less, and the stranger on the network: each evasion as a
scenario over simulated hours (injected clocks, no sleeps), asserting what the vendor sees or
that serving stops when the lease runs out; an honest customer under the same clock keeps
serving and raises no flag."""
