"""Deploying ctpi to Raspberry Pis: desktop-side staging (``stage``), single-host shipping over
SSH (``ship``), the Pi-side steps every deploy runs (``release.sh``) and the Ansible playbook for
fleets (``playbook.yml``). Runs on the desktop; nothing here is imported by ``device/``."""
