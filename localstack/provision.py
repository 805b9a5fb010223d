"""Deploys infra/template.yaml through CloudFormation (LocalStack or AWS) and prints the
settings the binaries read, as shell exports.

Usage: provision.py [--stack NAME] [--prefix PREFIX] [--endpoint URL]
Uses the standard AWS configuration (AWS_ENDPOINT_URL, AWS_REGION, credentials).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import boto3

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "template.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", default=os.environ.get("SPILLWAY_STACK", "spillway"))
    p.add_argument("--prefix", default=os.environ.get("SPILLWAY_PREFIX", "spillway"))
    p.add_argument("--param", action="append", default=[], help="KEY=VALUE template parameter")
    args = p.parse_args()

    os.environ.setdefault("AWS_REGION", "us-east-1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    cfn = boto3.client("cloudformation", region_name=os.environ["AWS_REGION"])
    params = [{"ParameterKey": "Prefix", "ParameterValue": args.prefix}]
    for kv in args.param:
        k, _, v = kv.partition("=")
        params.append({"ParameterKey": k, "ParameterValue": v})
    body = TEMPLATE.read_text()

    try:
        cfn.describe_stacks(StackName=args.stack)
        exists = True
    except cfn.exceptions.ClientError:
        exists = False
    try:
        if exists:
            cfn.update_stack(StackName=args.stack, TemplateBody=body, Parameters=params,
                             Capabilities=["CAPABILITY_IAM"])
        else:
            cfn.create_stack(StackName=args.stack, TemplateBody=body, Parameters=params,
                             Capabilities=["CAPABILITY_IAM"])
    except cfn.exceptions.ClientError as e:
        if "No updates are to be performed" not in str(e):
            raise

    deadline = time.time() + 300
    while True:
        stack = cfn.describe_stacks(StackName=args.stack)["Stacks"][0]
        status = stack["StackStatus"]
        if status.endswith("_COMPLETE") and "ROLLBACK" not in status:
            break
        if status.endswith("_FAILED") or "ROLLBACK" in status or time.time() > deadline:
            events = cfn.describe_stack_events(StackName=args.stack)["StackEvents"][:10]
            for ev in events:
                print(f"{ev['LogicalResourceId']}: {ev['ResourceStatus']} {ev.get('ResourceStatusReason', '')}",
                      file=sys.stderr)
            print(f"stack {args.stack} ended in {status}", file=sys.stderr)
            return 1
        time.sleep(1)

    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    names = {
        "TopicArn": "SPILLWAY_TOPIC_ARN",
        "WorkerQueueUrl": "SPILLWAY_QUEUE_URL",
        "WorkerDeadLetterQueueUrl": "SPILLWAY_DLQ_URL",
    }
    for key, value in sorted(outputs.items()):
        env = names.get(key)
        if env:
            print(f"export {env}={value}")
        else:
            print(f"# {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
