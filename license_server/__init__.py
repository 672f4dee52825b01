"""The vendor's license server: issues signed keys, takes activations, heartbeats and usage
reports from customers' clusters, revokes, and reports usage for billing."""
