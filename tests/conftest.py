"""Every test process sees 4 CPU devices, so sharded and 1-device runs can be compared."""
import os

_flag = '--xla_force_host_platform_device_count=4'
if _flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
