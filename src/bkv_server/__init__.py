"""What every service shares, and no device needs: the internal RPC server
(rpc.py) and client (http.py), the FastAPI frontend's guards and the uvicorn
runner (service.py), the command-line shell and settings (shell.py,
settings.py), etcd (etcd.py, fleetmap.py, log_keys.py) and metrics. The
contract the client shares -- models, labels, transcripts, Noise -- is
``bkv_protocol``."""
