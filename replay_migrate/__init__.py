"""replay-migrate: the project's shared root (version and the exception hierarchy).

Every other package may import this one; it imports only the standard library, and it is also
copied into the guest image beside the recorder agent.
"""

__version__ = "0.1.0"
