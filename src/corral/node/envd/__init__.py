"""The E2B envd protocol (process + filesystem Connect RPC, /files HTTP), served by the node."""
