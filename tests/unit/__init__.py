"""Pure functions and in-process components: seconds, no sockets."""
