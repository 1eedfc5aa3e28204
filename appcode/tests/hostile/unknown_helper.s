# expect: reject UnknownHelper
call 99
exit
