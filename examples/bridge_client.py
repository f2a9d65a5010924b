"""Share one loaded model between processes: start `llamacompat serve`, then use it as a normal context."""

import os
import subprocess
import sys
import tempfile

from llamacompat import init_llama

socket_path = os.path.join(tempfile.mkdtemp(), "bridge.sock")
server = subprocess.Popen([sys.executable, "-m", "llamacompat.cli", "serve", "--socket", socket_path],
                          stdout=subprocess.PIPE, text=True)
try:
    print(server.stdout.readline().strip())  # "llamacompat: serving on unix:..." once the model is loaded
    with init_llama({"backend": "bridge", "socket": socket_path}) as ctx:
        result = ctx.completion({"messages": [{"role": "user", "content": "Name the capital of France."}],
                                 "n_predict": 24, "temperature": 0},
                                lambda event: print(event["token"], end="", flush=True))
        print(f"\nserved by {ctx.capabilities['server_backend']}, {result['tokens_predicted']} tokens")
finally:
    server.terminate()
    server.wait(30)
