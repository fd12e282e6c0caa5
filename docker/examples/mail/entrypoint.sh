#!/bin/sh
# Start the demo mail server: certificate, users, Dovecot in the background, Postfix in the
# foreground (PID 1's child). SIGTERM stops both.
set -eu
: "${MASTER_PASSWORD:?set MASTER_PASSWORD (the same as popgate's master password)}"
USERS=${DEMO_USERS:-demo:demo alice:alice}

if [ ! -f /etc/dovecot/private/mail.key ]; then
    mkdir -p /etc/dovecot/private
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=${HOSTNAME:-mail}" \
        -keyout /etc/dovecot/private/mail.key -out /etc/dovecot/private/mail.crt 2>/dev/null
    chmod 600 /etc/dovecot/private/mail.key
fi
: >/etc/dovecot/users
for pair in $USERS; do
    printf '%s:{PLAIN}%s\n' "${pair%%:*}" "${pair#*:}" >>/etc/dovecot/users
done
printf 'popgate-master:{PLAIN}%s\n' "$MASTER_PASSWORD" >/etc/dovecot/master-users
chown root:dovecot /etc/dovecot/users /etc/dovecot/master-users
chmod 640 /etc/dovecot/users /etc/dovecot/master-users
chown vmail:vmail /var/mail

dovecot
trap 'postfix stop; doveadm stop; exit 0' TERM INT
postfix start-fg &
wait $!
