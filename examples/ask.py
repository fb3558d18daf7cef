"""Ask an Evertune serving endpoint one question with the OpenAI chat API shape.

    python examples/ask.py http://127.0.0.1:8000/v1 "Route this ticket: ..." [--expect-version 3]

Prints the answer and the version that produced it (`x-evertune-version`). With
`--expect-version N` it exits 1 unless version N answered, i.e. unless N is in PROD. Plain
`urllib` so it runs with no extra package; the `openai` client works the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_url", help="The /v1 base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("question")
    ap.add_argument("--model", default="assistant",
                    help="Model name (NAME serves PROD, NAME@vN a version).")
    ap.add_argument("--api-key", default="", help="A serving key, if the workspace has any.")
    ap.add_argument("--expect-version", help="Fail unless this version answered.")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="Seconds to wait for --expect-version to answer.")
    args = ap.parse_args()
    body = {"model": args.model, "messages": [{"role": "user", "content": args.question}],
            "max_tokens": 16, "temperature": 0}
    req = urllib.request.Request(
        args.base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json",
                 **({"authorization": f"Bearer {args.api_key}"} if args.api_key else {})},
    )
    # The server follows the stage aliases every serve.follow_seconds and loads the new version
    # before it switches, so a version promoted a moment ago may take a few seconds to answer.
    deadline = time.monotonic() + args.wait
    while True:
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.load(resp)
                version = resp.headers.get("x-evertune-version", "?")
        except urllib.error.HTTPError as exc:
            print(f"error: {exc.code} from {req.full_url}: {exc.read().decode(errors='replace')}",
                  file=sys.stderr)
            return 1
        if not args.expect_version or version.lstrip("v") == str(args.expect_version).lstrip("v"):
            break
        if time.monotonic() > deadline:
            print(f"error: expected version {args.expect_version} to answer, "
                  f"got {version} for {args.wait:g} s", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"{answer['model']} (version {version}) answered: "
          f"{answer['choices'][0]['message']['content']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
