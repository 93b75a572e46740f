"""vault-island: keeps sealed records in etcd and runs every state change as
a compare-and-swap transaction, so any number of replicas serve one island."""
