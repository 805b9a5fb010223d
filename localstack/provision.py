"""Deploys infra/template.yaml through CloudFormation (LocalStack or AWS) and prints the
settings the binaries read, as shell exports.

Usage: provision.py [--stack NAME] [--prefix PREFIX] [--endpoint URL | --aws]
Deploys to LocalStack unless told otherwise: --endpoint (default AWS_ENDPOINT_URL, else
http://127.0.0.1:4566, with LocalStack's test credentials when none are set); --aws deploys
to the real AWS account of the standard AWS configuration instead. The endpoint is exported
with the settings, so the binaries started from the same shell talk to the same place.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import boto3

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "template.yaml"


def update_parameters(given: list, current: list) -> list:
    """The parameters of an update: those given, and every other one the stack has, kept.

    CloudFormation resets a parameter left out of an update to its default (it does not keep
    the stack's value the way `aws cloudformation deploy` does): run for its exports on the
    stack the Lambda deploy made, this script set DeployFunctions=false and deleted the
    functions.
    """
    named = {p["ParameterKey"] for p in given}
    kept = [{"ParameterKey": p["ParameterKey"], "UsePreviousValue": True}
            for p in current if p["ParameterKey"] not in named]
    return given + kept


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", default=os.environ.get("SPILLWAY_STACK", "spillway"))
    p.add_argument("--prefix", default=os.environ.get("SPILLWAY_PREFIX", "spillway"))
    p.add_argument("--param", action="append", default=[], help="KEY=VALUE template parameter")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
                        help="LocalStack's URL (default: AWS_ENDPOINT_URL, else http://127.0.0.1:4566)")
    target.add_argument("--aws", action="store_true",
                        help="deploy to the real AWS account of the standard AWS configuration")
    args = p.parse_args()

    os.environ.setdefault("AWS_REGION", "us-east-1")
    if args.aws:
        # Never a LocalStack endpoint left in the environment by an earlier eval.
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        # Without an endpoint, boto3 would deploy to whatever real account the environment's
        # credentials belong to.
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
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
            current = cfn.describe_stacks(StackName=args.stack)["Stacks"][0].get("Parameters", [])
            cfn.update_stack(StackName=args.stack, TemplateBody=body,
                             Parameters=update_parameters(params, current),
                             Capabilities=["CAPABILITY_IAM"])
        else:
            cfn.create_stack(StackName=args.stack, TemplateBody=body, Parameters=params,
                             Capabilities=["CAPABILITY_IAM"])
    except cfn.exceptions.ClientError as e:
        if "not yet been emulated" in str(e) and not args.aws:
            # LocalStack's free edition has no UpdateStack: keep the stack as it is.
            print(f"LocalStack cannot update stack {args.stack}; using it as it is "
                  "(delete it to deploy the template again)", file=sys.stderr)
        elif "No updates are to be performed" not in str(e):
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
    if not args.aws:
        for env in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            print(f"export {env}={os.environ[env]}")
    for key, value in sorted(outputs.items()):
        env = names.get(key)
        if env:
            print(f"export {env}={value}")
        else:
            print(f"# {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
